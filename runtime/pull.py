"""Pull an image back from a registry by digest and check it is the image a record names.

A digest reference (`REPO@sha256:...`) names content, so what the daemon pulls is what was
pushed; the check here is that it is also the image the build record or manifest names
(the same image id), so a manifest that pairs one image's id with another's digest is
caught instead of silently running something else.
"""

from __future__ import annotations

import re

from qlc.runtime.docker_engine import Engine, ImageInfo

DIGEST_REFERENCE = re.compile(r"^(?P<repository>[^@\s]+)@(?P<digest>sha256:[0-9a-f]{64})$")


class ImageMismatch(Exception):
    """The pulled image is not the one the record names."""


def digest_reference(value: object) -> str | None:
    """`value` when it is a pullable REPO@sha256:<64 hex> reference, else None."""
    if isinstance(value, str) and DIGEST_REFERENCE.fullmatch(value):
        return value
    return None


def pull_verified(engine: Engine, reference: str, expected_id: str | None) -> ImageInfo:
    """Pull `reference`; raise ImageMismatch unless it is `expected_id` (when one is known).

    PullError (an EngineError) comes through when the registry cannot serve it."""
    match = DIGEST_REFERENCE.fullmatch(reference)
    if match is None:
        raise ImageMismatch(f"{reference!r} is not a REPO@sha256:... reference: nothing to pull")
    image = engine.pull(reference)
    digest = match["digest"]
    if not any(known.endswith(f"@{digest}") for known in image.repo_digests):
        raise ImageMismatch(
            f"the daemon pulled {reference} but lists its digests as "
            f"{', '.join(image.repo_digests) or 'none'}: not the pushed image"
        )
    if expected_id and image.id != expected_id:
        raise ImageMismatch(
            f"{reference} is image {image.id}, but the record names image {expected_id}: "
            "the registry holds a different image under this name; rebuild with "
            "`qlc build SPEC` and push again"
        )
    return image
