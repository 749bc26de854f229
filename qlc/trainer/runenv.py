"""The process's view of its run, read once from the environment the launch path set
(names in qlc.contract) and from the launcher (torchrun's RANK / LOCAL_RANK / WORLD_SIZE)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qlc import contract


@dataclass(frozen=True)
class RunEnv:
    output_dir: Path
    model_path: str | None  # a local model.path as mounted (container) or found (--local)
    data_path: str | None  # a local data.path likewise
    smoke: bool
    rank: int
    local_rank: int
    world_size: int
    launched: bool  # a launcher (torchrun) started this process
    run_id: str | None
    image_id: str | None
    image_digest: str | None
    base_image: str | None
    profile_steps: int
    input_paths: dict[str, str] = field(default_factory=dict)  # the other local inputs

    @staticmethod
    def read(environ: Mapping[str, str]) -> RunEnv:
        profile = environ.get(contract.ENV_PROFILE_STEPS, "").strip()
        return RunEnv(
            output_dir=Path(environ.get(contract.ENV_OUTPUT_DIR) or "out"),
            model_path=environ.get(contract.ENV_MODEL_PATH) or None,
            data_path=environ.get(contract.ENV_DATA_PATH) or None,
            smoke=environ.get(contract.ENV_SMOKE, "") == "1",
            rank=int(environ.get("RANK", "0")),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            world_size=int(environ.get("WORLD_SIZE", "1")),
            launched="WORLD_SIZE" in environ or "LOCAL_RANK" in environ,
            run_id=environ.get(contract.ENV_RUN_ID) or None,
            image_id=environ.get(contract.ENV_IMAGE_ID) or None,
            image_digest=environ.get(contract.ENV_IMAGE_DIGEST) or None,
            base_image=environ.get(contract.ENV_BASE_IMAGE) or None,
            profile_steps=int(profile) if profile.isdigit() else 0,
            input_paths=_input_paths(environ.get(contract.ENV_INPUT_PATHS)),
        )

    @property
    def writes(self) -> bool:
        """Rank 0 writes the run's records; the other processes train their share."""
        return self.rank == 0


def _input_paths(text: str | None) -> dict[str, str]:
    """{spec key: path} from the launch path's JSON; anything else reads as none."""
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(k): v for k, v in found.items() if isinstance(v, str)}
