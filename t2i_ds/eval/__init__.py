"""Evaluation of generated images: FID (fid.py), the demo's caption consistency (consistency.py); command in __main__."""
