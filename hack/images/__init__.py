"""Container images for the real node, built locally with buildah (no registry).

See ``images.build``: the sandbox (pause) image, the stand-ins for the base
images the Dockerfiles name, the operator and runtime images built from the
repository's Dockerfiles unchanged, each cached by content and loaded into the
node's containerd.
"""

from images.build import ensure_pause, ensure_project_images  # noqa: F401
