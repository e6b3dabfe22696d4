"""Evaluation of generated images: FID (fid.py), CLIP score (clip_score.py), the one-page run report (report.py);
command in __main__. (The demo's caption-consistency judge lives with the demo, t2i_ds/demo/judge.py.)"""
