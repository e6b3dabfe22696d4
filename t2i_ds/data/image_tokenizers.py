"""The image-tokenizer registry: a spec `kind:DIR` names a registered loader and the directory it loads.

A kind is registered with `register_image_tokenizer(kind, loader)`, where `loader(DIR, **options)` returns an
ImageTokenizer (t2i_ds.data.tokenizers). MoVQGAN (`movqgan:DIR`, a diffusers VQModel directory) is registered
here; an extension registers its own kind when its package is imported: the embedded demo's patch k-means
tokenizer (`demo:DIR`) registers in t2i_ds/demo/__init__.py, so the library never imports its example. The
commands that take a spec or a run import t2i_ds.demo for that reason (tests/test_layout.py names them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch loads with the first tokenizer, not with the registry (configs are checked without torch)
    from t2i_ds.data.tokenizers import ImageTokenizer

Loader = Callable[..., "ImageTokenizer"]  # loader(directory, **options) -> ImageTokenizer

_LOADERS: dict[str, Loader] = {}


def register_image_tokenizer(kind: str, loader: Loader) -> None:
    """Make `kind:DIR` specs load through `loader`; registering a kind twice with another loader is an error."""
    if not kind.isidentifier():
        raise ValueError(f"image tokenizer kind {kind!r} must be an identifier (it is the part of a spec before ':')")
    if _LOADERS.get(kind, loader) is not loader:
        raise ValueError(f"image tokenizer kind {kind!r} is already registered to {_LOADERS[kind]}")
    _LOADERS[kind] = loader


def image_tokenizer_kinds() -> list[str]:
    return sorted(_LOADERS)


def parse_image_tokenizer_spec(spec: str) -> tuple[str, str]:
    """`kind:DIR` -> (kind, DIR); ValueError (one line) for a malformed spec or an unregistered kind."""
    kind, sep, path = spec.partition(":")
    known = ", ".join(f"'{k}:DIR'" for k in image_tokenizer_kinds())
    if not sep or not path:
        raise ValueError(f"image tokenizer spec {spec!r} must be one of {known}")
    if kind not in _LOADERS:
        raise ValueError(f"unknown image tokenizer kind {kind!r} in {spec!r} (registered: {known}; a kind registers "
                         "when its package is imported, e.g. `import t2i_ds.demo` for 'demo:DIR')")
    return kind, path


def load_image_tokenizer(spec: str, **options: Any) -> ImageTokenizer:
    """The ImageTokenizer a spec names; `options` go to its loader (MoVQGAN: image_size, batch_size, device)."""
    kind, path = parse_image_tokenizer_spec(spec)
    return _LOADERS[kind](path, **options)


def describe_image_tokenizer(tok: ImageTokenizer, spec: str) -> dict:
    """The manifest entry of an image tokenizer: name, path, codebook_size, grid, image_size."""
    if hasattr(tok, "describe"):
        return tok.describe()
    kind, _, path = spec.partition(":")
    return {
        "name": kind,
        "path": path,
        "codebook_size": int(tok.codebook_size),
        "grid": list(tok.grid),
        "image_size": int(tok.image_size),
    }


def _load_movqgan(path: str, **options: Any) -> ImageTokenizer:
    from t2i_ds.data.movqgan import MoVQGANTokenizer  # lazy: diffusers is heavy, and parsing a spec needs none

    return MoVQGANTokenizer.load(path, **options)


register_image_tokenizer("movqgan", _load_movqgan)
