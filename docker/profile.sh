# KubeRay starts Ray with `bash -lc`; a login shell may reset PATH (Debian's /etc/profile does),
# so put the image's virtual environment back in front.
export PATH=/opt/tandem/venv/bin:$PATH
