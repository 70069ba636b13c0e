"""The local Ray cluster the worker tests deploy on."""

import ray


def start_local_ray(num_cpus: int) -> None:
    """Ray on this machine with num_cpus logical CPUs (workers share the real cores), quiet,
    with the Triton interpreter for CPU kernels and no Hugging Face downloads."""
    ray.init(
        address="local",  # never a cluster some other run left behind
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}},
    )
