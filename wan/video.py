"""Moved to `wan.io.video`; this path re-exports it for one release (0.2) and then goes."""

from wan.io.video import (  # noqa: F401
    SUFFIXES,
    check_encoder,
    check_output_path,
    export_to_video,
    write_video,
    write_video_or_frames,
)
