"""Regenerate skypilot-schemas.json from SkyPilot itself, and check the SkyPilot goldens.

SkyPilot cannot share qlc's dev environment (it pins click<8.2, huggingface_hub needs
click>=8.4.2), so its task, resources and storage (a file_mounts entry) JSON schemas are
stored here, taken from the package (sky.utils.schemas), and the tests validate against them
with jsonschema. Run in a separate venv:

    python3 -m venv /tmp/skyvenv && /tmp/skyvenv/bin/pip install skypilot==0.14.1
    /tmp/skyvenv/bin/python tests/golden/export/regen_skypilot_schema.py

It also parses every skypilot golden task with sky.Task.from_yaml (SkyPilot's own loader).
"""

import json
from pathlib import Path

import sky
from sky.utils import schemas

HERE = Path(__file__).resolve().parent

stored = {
    "generated_by": "tests/golden/export/regen_skypilot_schema.py",
    "skypilot_version": sky.__version__,
    "task": schemas.get_task_schema(),
    "resources": schemas.get_resources_schema(),
    "storage": schemas.get_storage_schema(),  # a file_mounts entry with a source and a mode
}
(HERE / "skypilot-schemas.json").write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
for task_file in sorted(HERE.glob("skypilot-*/task.yaml")):
    task = sky.Task.from_yaml(str(task_file))
    modes = {path: storage.mode.value for path, storage in task.storage_mounts.items()}
    print(f"{task_file.relative_to(HERE)}: ok ({task.num_nodes} nodes, mounts {modes}, "
          f"{task.resources})")
