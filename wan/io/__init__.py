"""Files in and out: outputs written whole or not at all, videos, input images."""
