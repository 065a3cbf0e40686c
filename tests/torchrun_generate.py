"""generate.py's main, with the encoded MP4 replaced by the raw frames (.npy bytes at the same path).

MP4 encoding is lossy, so tests that compare videos across process layouts compare raw frames; the
rest of the command line (argument checks, loading, patching, parallelism, rank-0 writing, the
atomic rename) runs unchanged. Usage: [torchrun ...] tests/torchrun_generate.py GENERATE_ARGS...
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wan.video  # noqa: E402

wan.video.export_to_video = lambda frames, path, fps, quality: np.save(open(path, "wb"), np.stack(frames))

import generate  # noqa: E402

sys.exit(generate.main(sys.argv[1:]))
