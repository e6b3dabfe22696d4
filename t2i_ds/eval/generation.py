"""COCO-30K as users run it: the caption list, and one PNG per caption generated over any number of ranks.

Caption selection (`coco_captions`, the command `python -m t2i_ds.eval coco-captions`): from a COCO captions
file (`captions_val2014.json`: 40,504 images, ~5 captions each), n distinct image ids drawn with numpy's
`default_rng(seed)` from the sorted ids (`choice(..., replace=False)`), kept in increasing id order, then one
caption per image drawn with the same generator from that image's captions ordered by annotation id;
whitespace collapsed. The list is a function of (annotation file, n, seed): it names the file's sha256, and line
i is caption index i, which keys that image's sampling noise.

Generation (`generate_folder`, the command `t2i_ds.generate --out_dir`): rank r of W (RANK / WORLD_SIZE from the
launcher) takes the captions with index i = r mod W, skips those whose `{i:06d}.png` exists, samples the rest
with the fast loop keyed by caption index (t2i_ds.sampling), decodes each image alone (so its pixels never
depend on a batch) and writes it atomically. Killing a run and rerunning it, at any number of ranks, gives the
same files byte for byte. `generation.json` in the folder records the settings; a rerun with other settings is
refused instead of mixing images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from t2i_ds.atomic import atomic_path, atomic_write_text
from t2i_ds.progress import Progress

SETTINGS_FILE = "generation.json"


def image_name(index: int) -> str:
    return f"{index:06d}.png"


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def coco_captions(annotations: str | os.PathLike, n: int, seed: int) -> tuple[list[dict], dict]:
    """Rows {"index", "image_id", "file_name", "caption"} for n images (0: all), and the selection's description."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations {path} do not exist (e.g. annotations/captions_val2014.json)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
        by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for a in data["annotations"]:
            by_image[int(a["image_id"])].append((int(a["id"]), str(a["caption"])))
        files = {int(im["id"]): im.get("file_name", "") for im in data.get("images", [])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a COCO captions file (needs 'annotations' with image_id, id, caption): {e}") from e
    ids = sorted(by_image)
    if n < 0 or n > len(ids):
        raise ValueError(f"--n {n}: {path} has captions for {len(ids)} images")
    rng = np.random.default_rng(seed)
    chosen = sorted(int(ids[k]) for k in rng.choice(len(ids), size=n or len(ids), replace=False))
    rows = []
    for i, image_id in enumerate(chosen):
        caps = sorted(by_image[image_id])  # by annotation id
        caption = " ".join(caps[int(rng.integers(len(caps)))][1].split())
        rows.append({"index": i, "image_id": image_id, "file_name": files.get(image_id, ""), "caption": caption})
    info = {
        "annotations": str(path.resolve()), "annotations_sha256": sha256_bytes(raw), "images_total": len(ids),
        "n": len(rows), "seed": seed,
        "method": "n image ids by numpy default_rng(seed).choice(sorted ids, replace=False), sorted; then one caption "
                  "per image by the same generator's integers(k) over its captions ordered by annotation id",
    }
    return rows, info


def write_captions(rows: list[dict], info: dict, out: str | os.PathLike) -> Path:
    """The .jsonl (one row a line, line i = caption index i) and its selection beside it (`<out>.meta.json`)."""
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(meta_path(out), json.dumps(info, indent=2) + "\n")
    return out


def meta_path(captions: str | os.PathLike) -> Path:
    return Path(f"{captions}.meta.json")


def read_caption_file(path) -> list[str]:
    """Every caption of a captions file, line i (from 0) as caption index i, whatever the lines hold.

    .txt: one caption per line, stripped; a blank line is an empty caption (it keeps its index; the caller may warn).
    .jsonl: one JSON object per line with a string "caption" (or "text") field; a file with any bad line (not JSON,
    no such field, blank) is refused up front with one line naming the file and every bad line (the first 5, and
    how many more), so no caption is ever drawn under another line's index. Blank lines at the end of either are
    not captions. Lines end at "\n" only: a caption holding U+2028 or a form feed stays one caption.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines]
    captions, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            bad.append(f"line {number} is blank (write {{\"caption\": \"\"}} for an empty caption)")
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            bad.append(f"line {number} is not JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})")
            continue
        caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(caption, str):
            bad.append(f"line {number} has no string 'caption' (or 'text') field")
            continue
        captions.append(caption)
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{path}: {'; '.join(bad[:5])}{more}: fix these lines (line i is caption index i - 1, so "
                         "removing one moves every later caption); nothing was drawn")
    return captions


def read_captions(path, n: int | None) -> list[str]:
    """The first n captions of a .txt or .jsonl captions file (`read_caption_file`: line i is caption index i)."""
    captions = read_caption_file(path)
    if n is not None and n > 0:
        if len(captions) < n:
            raise ValueError(f"{path} has {len(captions)} captions, fewer than --n {n}")
        captions = captions[:n]
    if len(captions) < 2:
        raise ValueError(f"{path}: FID needs at least 2 captions, got {len(captions)}")
    return captions


# ----------------------------------------------------------------------------------------------------------------
# Sharded, resumable generation
# ----------------------------------------------------------------------------------------------------------------


def launcher_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as deepspeed's launcher and torchrun set them; (0, 1) for a single process."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def check_settings(out_dir: Path, settings: dict) -> None:
    """Write the folder's settings on first use; refuse a rerun whose settings differ (its images would mix)."""
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out_dir} holds images generated with other settings {diff} (old, new): use another --out_dir")
        return
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")  # every rank writes the same bytes


def write_png(image: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def generate_folder(run, captions: Sequence[str], out_dir: str | os.PathLike, *, cfg_scale: float, top_k: int | None,
                    temperature: float, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                    describe: dict | None = None, compile: bool | dict = False, only: Sequence[int] | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """This rank's share of `captions` as `out_dir/{index:06d}.png`, skipping existing files; a summary dict.

    run: a t2i_ds.inference.InferenceRun (model, vocab, text_tokenizer, image_tokenizer).
    describe: what identifies the model (run directory, checkpoint), recorded with the settings.
    only: generate just these caption indices (each still keyed by its index: the same image as in the full run).
    """
    from t2i_ds.data.images import to_uint8
    from t2i_ds.sampling import generate_images

    if run.image_tokenizer is None:
        raise ValueError("the run's config names no train.image_tokenizer to decode images with")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"captions": len(captions), "captions_sha256": sha256_bytes("\n".join(captions).encode()),
                "cfg_scale": cfg_scale, "top_k": top_k, "temperature": temperature, "seed": seed,
                "sampler": "t2i_ds.sampling fast loop, t2i::cfg_sample keyed by (seed, caption index)", **(describe or {})}
    check_settings(out_dir, settings)
    wanted = range(len(captions)) if only is None else sorted(set(only))
    if only is not None and any(not 0 <= i < len(captions) for i in wanted):
        raise ValueError(f"caption indices {[i for i in wanted if not 0 <= i < len(captions)]} outside the {len(captions)} captions")
    mine = [i for i in wanted if i % world == rank]
    todo = [i for i in mine if not (out_dir / image_name(i)).exists()]
    log(f"[generate] rank {rank}/{world}: {len(mine)} captions, {len(mine) - len(todo)} already written, {len(todo)} to go")
    vocab, device = run.vocab, next(run.model.parameters()).device
    ids = dict(zip(todo, run.text_tokenizer.encode_batch([captions[i] for i in todo])))
    todo.sort(key=lambda i: (len(vocab.prompt(ids[i])), i))  # similar lengths share a batch: little padding
    with Progress(len(todo), f"[generate] rank {rank}/{world}", "images", rank=rank) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            codes = generate_images(run.model, vocab, [ids[i] for i in batch], indices=batch, cfg_scale=cfg_scale,
                                    top_k=top_k, temperature=temperature, seed=seed, batch_size=batch_size,
                                    compile=compile)  # (b, image_tokens)
            for i, c in zip(batch, codes):
                image = to_uint8(run.image_tokenizer.decode(c[None].to(device)))[0]  # alone: no batch effects
                write_png(image, out_dir / image_name(i))
            bar.update(len(batch))
    return {"rank": rank, "world": world, "captions": len(mine), "generated": len(todo), "out_dir": str(out_dir)}


def missing_images(out_dir: str | os.PathLike, n: int) -> list[int]:
    return [i for i in range(n) if not (Path(out_dir) / image_name(i)).is_file()]
