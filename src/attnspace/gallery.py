"""The README gallery: small copies of the figures and the claims table under docs/gallery/,
and the README's two generated blocks refreshed from them.

The README holds two blocks, each between a begin and an end marker on lines of their own::

    <!-- gallery:begin --> ... <!-- gallery:end -->
    <!-- claims:begin --> ... <!-- claims:end -->

Everything between the markers is rewritten; everything else in the README is left as is.
Run by the ``gallery`` rule (``make gallery``), never by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from attnspace.files import atomic_path, write_text

BLOCKS = ("gallery", "claims")


def shrink_png(src: Path | str, dst: Path | str, width: int) -> Path:
    """Write ``src`` scaled to ``width`` pixels wide (aspect kept; never enlarged), 256 colours, as ``dst``."""
    from PIL import Image

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
        # a 256-colour palette: line plots lose nothing visible, the file shrinks about threefold
        im = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        with atomic_path(dst) as tmp:
            im.save(tmp, format="PNG", optimize=True)
    return dst


def first_sentence(text: str) -> str:
    """The first sentence of a caption (up to the first '. ' or ': ' that ends a clause), one line."""
    flat = " ".join(text.split())
    m = re.search(r"[.:](\s|$)", flat)
    return flat[: m.start()] if m else flat


def gallery_markdown(figures: list[tuple[str, str, str]], columns: int = 2) -> str:
    """figures: (name, image path relative to the README, caption text) -> a Markdown grid of
    ``columns`` figures a row, each with its name and its caption's first sentence."""
    cells = [f"![{name}]({image})<br>**{name}**: {first_sentence(caption)}." for name, image, caption in figures]
    cells += [""] * (-len(cells) % columns)
    rows = ["|" + " |" * columns, "|" + "---|" * columns]
    rows += ["| " + " | ".join(cells[i:i + columns]) + " |" for i in range(0, len(cells), columns)]
    return "\n".join(rows) + "\n"


def replace_block(text: str, block: str, body: str, where: str = "README") -> str:
    """``text`` with the lines between ``<!-- block:begin -->`` and ``<!-- block:end -->`` replaced by ``body``."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{where} needs one '{begin}' line followed by one '{end}' line "
                         "(the generated block goes between them). Fix: add the two marker lines.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body.strip()}\n{end}{tail}"


def update_readme(readme: Path | str, blocks: dict[str, str]) -> bool:
    """Rewrite the generated blocks of ``readme``; False (nothing written) when it does not exist."""
    readme = Path(readme)
    if not readme.is_file():
        return False
    text = readme.read_text()
    for block, body in blocks.items():
        text = replace_block(text, block, body, str(readme))
    write_text(text, readme)
    return True
