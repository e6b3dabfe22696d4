"""The English corpus of the miniature's language model: the prose of the Python documentation.

Source: Debian's `python3.11-doc` package (the Python 3.11 documentation as HTML, 67 MB installed,
PSF License Version 2), installed by one command:

    apt-get install python3.11-doc      # puts the HTML under /usr/share/doc/python3.11/html

Only running prose is kept: the text of every `<p>` element (inline markup such as `<code>` kept as its
text, code blocks, tables, navigation and index pages dropped), whitespace collapsed, one paragraph a
line; paragraphs of fewer than MIN_WORDS words are dropped. The files are read in sorted path order and
every HELDOUT_EVERY-th paragraph goes to the held-out split, so both splits are functions of the package
alone. The `--quick` path reads `t2i_ds/assets/python_docs_excerpt.txt` (paragraphs of the same
extraction, shipped) through the same split.
"""

from __future__ import annotations

import html.parser
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEBIAN_PACKAGE = "python3.11-doc"
DEBIAN_HTML = Path("/usr/share/doc/python3.11/html")
INSTALL_HINT = f"apt-get install {DEBIAN_PACKAGE}"
EXCERPT_ASSET = "python_docs_excerpt.txt"
MIN_WORDS = 8  # shorter <p> are captions, labels and "See also" stubs, not running text
HELDOUT_EVERY = 50  # 2% of the paragraphs are held out
SKIP_PAGES = ("genindex", "py-modindex", "search")  # index pages: lists of names, no prose
_SPACE = re.compile(r"\s+")


class CorpusMissing(FileNotFoundError):
    """The corpus package is not installed (a user error: one line saying how to install it)."""


class _Paragraphs(html.parser.HTMLParser):
    """Collects the text of each `<p>`; `<pre>` inside a paragraph (rare) is dropped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth_p = self._depth_pre = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self._depth_p += 1
        elif tag == "pre":
            self._depth_pre += 1

    def handle_endtag(self, tag):
        if tag == "pre" and self._depth_pre:
            self._depth_pre -= 1
        elif tag == "p" and self._depth_p:
            self._depth_p -= 1
            if not self._depth_p:
                self.paragraphs.append(_SPACE.sub(" ", "".join(self._parts)).strip())
                self._parts = []

    def handle_data(self, data):
        if self._depth_p and not self._depth_pre:
            self._parts.append(data)


def html_paragraphs(text: str) -> list[str]:
    """The running-prose paragraphs of one HTML page (at least MIN_WORDS words each)."""
    parser = _Paragraphs()
    parser.feed(text)
    parser.close()
    return [p for p in parser.paragraphs if len(p.split()) >= MIN_WORDS]


def debian_paragraphs(html_dir: Path = DEBIAN_HTML) -> list[str]:
    """Every paragraph of the installed documentation, in sorted path order; CorpusMissing names the install."""
    pages = sorted(p for p in html_dir.rglob("*.html") if p.stem not in SKIP_PAGES) if html_dir.is_dir() else []
    if not pages:
        raise CorpusMissing(f"the English corpus is missing: no HTML pages under {html_dir}; install it with "
                            f"`{INSTALL_HINT}` (Debian's Python documentation, PSF License) or run with --quick")
    return [para for page in pages for para in html_paragraphs(page.read_text(encoding="utf-8", errors="replace"))]


def excerpt_paragraphs() -> list[str]:
    """The shipped excerpt (one paragraph a line)."""
    text = (resources.files("t2i_ds") / "assets" / EXCERPT_ASSET).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@dataclass(frozen=True)
class Corpus:
    """The two splits on disk, one paragraph a line."""

    train: Path
    heldout: Path

    def sizes(self) -> dict[str, int]:
        """Bytes of each split."""
        return {"train_bytes": self.train.stat().st_size, "heldout_bytes": self.heldout.stat().st_size}


def write_corpus(paragraphs: list[str], out_dir: Path) -> Corpus:
    """Split (every HELDOUT_EVERY-th paragraph held out) and write `train.txt` and `heldout.txt`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout = [p for i, p in enumerate(paragraphs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [p for i, p in enumerate(paragraphs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    corpus = Corpus(out_dir / "train.txt", out_dir / "heldout.txt")
    corpus.train.write_text("\n".join(train) + "\n", encoding="utf-8")
    corpus.heldout.write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return corpus
