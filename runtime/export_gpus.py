"""What qlc knows about the GPUs behind the batch services' instance types, as data.

One table a fact: the GPUs, vCPUs and memory of an AWS instance type, the GPUs built into a
GCP machine type, the GPU each service's accelerator name means, and each GPU's compute
capability. The GPU names are those of compiler/data/shapes.toml (its memory sizes serve the
estimate check of `qlc export --check`), plus V100, which that table does not size.
"""

from __future__ import annotations

# GPU -> compute capability (NVIDIA's CUDA GPUs page).
COMPUTE_CAPABILITY = {
    "V100": "7.0", "T4": "7.5", "A100-40GB": "8.0", "A100-80GB": "8.0", "A10G": "8.6",
    "L4": "8.9", "L40S": "8.9", "H100": "9.0", "H200": "9.0",
}  # fmt: skip

# AWS instance type -> (GPUs, vCPUs, GiB of memory, GPU) (AWS instance type pages).
AWS_INSTANCES = {
    "g4dn.xlarge": (1, 4, 16, "T4"), "g4dn.2xlarge": (1, 8, 32, "T4"),
    "g4dn.12xlarge": (4, 48, 192, "T4"), "g4dn.metal": (8, 96, 384, "T4"),
    "g5.xlarge": (1, 4, 16, "A10G"), "g5.2xlarge": (1, 8, 32, "A10G"),
    "g5.4xlarge": (1, 16, 64, "A10G"), "g5.8xlarge": (1, 32, 128, "A10G"),
    "g5.12xlarge": (4, 48, 192, "A10G"), "g5.24xlarge": (4, 96, 384, "A10G"),
    "g5.48xlarge": (8, 192, 768, "A10G"), "g6.xlarge": (1, 4, 16, "L4"),
    "g6.2xlarge": (1, 8, 32, "L4"), "g6.12xlarge": (4, 48, 192, "L4"),
    "g6.48xlarge": (8, 192, 768, "L4"), "g6e.xlarge": (1, 4, 32, "L40S"),
    "g6e.12xlarge": (4, 48, 384, "L40S"), "g6e.48xlarge": (8, 192, 1536, "L40S"),
    "p3.2xlarge": (1, 8, 61, "V100"), "p3.8xlarge": (4, 32, 244, "V100"),
    "p3.16xlarge": (8, 64, 488, "V100"), "p4d.24xlarge": (8, 96, 1152, "A100-40GB"),
    "p4de.24xlarge": (8, 96, 1152, "A100-80GB"), "p5.48xlarge": (8, 192, 2048, "H100"),
    "p5e.48xlarge": (8, 192, 2048, "H200"),
}  # fmt: skip
# Instance families with NVIDIA GPUs; any other family cannot serve a GPU request.
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5",
                    "p5e", "p5en", "p6")  # fmt: skip

# GCP accelerator-optimized machine type -> (built-in GPUs, GPU) (GCP GPU machine types page).
GCP_GPU_MACHINES = {
    "a2-highgpu-1g": (1, "A100-40GB"), "a2-highgpu-2g": (2, "A100-40GB"),
    "a2-highgpu-4g": (4, "A100-40GB"), "a2-highgpu-8g": (8, "A100-40GB"),
    "a2-megagpu-16g": (16, "A100-40GB"), "a2-ultragpu-1g": (1, "A100-80GB"),
    "a2-ultragpu-2g": (2, "A100-80GB"), "a2-ultragpu-4g": (4, "A100-80GB"),
    "a2-ultragpu-8g": (8, "A100-80GB"), "a3-highgpu-8g": (8, "H100"),
    "a3-megagpu-8g": (8, "H100"), "g2-standard-4": (1, "L4"), "g2-standard-8": (1, "L4"),
    "g2-standard-12": (1, "L4"), "g2-standard-16": (1, "L4"), "g2-standard-24": (2, "L4"),
    "g2-standard-32": (1, "L4"), "g2-standard-48": (4, "L4"), "g2-standard-96": (8, "L4"),
}  # fmt: skip
GCP_DEFAULT_MACHINES = {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g",
                        8: "a2-highgpu-8g", 16: "a2-megagpu-16g"}  # fmt: skip
# GCP accelerator types attachable to N1 machines (gcloud compute accelerator-types list).
GCP_ACCELERATORS = {"nvidia-tesla-t4": "T4", "nvidia-tesla-v100": "V100",
                    "nvidia-tesla-a100": "A100-40GB", "nvidia-a100-80gb": "A100-80GB",
                    "nvidia-l4": "L4", "nvidia-h100-80gb": "H100"}  # fmt: skip

# SkyPilot accelerator names (sky show-gpus) -> GPU.
SKYPILOT_ACCELERATORS = {"V100": "V100", "T4": "T4", "A100": "A100-40GB",
                         "A100-80GB": "A100-80GB", "A10G": "A10G", "L4": "L4", "L40S": "L40S",
                         "H100": "H100", "H200": "H200"}  # fmt: skip


def runs_on(gpu_archs: list[str], capability: str) -> bool:
    """Whether code built for `gpu_archs` runs on a GPU of `capability`: CUDA binaries run on
    their own architecture and on later minor versions of the same major one (8.6 on 8.9)."""
    major, minor = (int(part) for part in capability.split("."))
    for arch in gpu_archs:
        arch_major, arch_minor = (int(part) for part in arch.split("."))
        if arch_major == major and arch_minor <= minor:
            return True
    return False


def gpu_of(target: str, instance_type: str | None, accelerator: str | None) -> str | None:
    """The GPU a target's instance type or accelerator name means, when qlc knows it."""
    if target == "aws-batch" and instance_type in AWS_INSTANCES:
        return AWS_INSTANCES[instance_type][3]
    if target == "gcp-batch":
        if accelerator is not None:
            return GCP_ACCELERATORS.get(accelerator)
        if instance_type in GCP_GPU_MACHINES:
            return GCP_GPU_MACHINES[instance_type][1]
    if target == "skypilot" and accelerator is not None:
        return SKYPILOT_ACCELERATORS.get(accelerator)
    return None
