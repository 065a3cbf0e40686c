"""Wan2.1 text-to-video integration of NABLA sparse attention."""
