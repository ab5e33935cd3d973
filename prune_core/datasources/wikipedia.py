"""The built-in `wikipedia` dataset: English Wikipedia articles shipped in the PyPI wheel `gensim==4.4.0`.

Why: perplexity on the calibration domain alone hides how much pruning (and least-squares refits)
overfit it; `wikipedia` is a held-out text of another domain (modern encyclopedic prose) that needs
no network at run time once fetched. It is meant for evaluation (`evaluation.dataset = "wikipedia"`);
calibrate on shakespeare or your own text.

Source: gensim's test data member `gensim/test/test_data/enwiki-latest-pages-articles1.xml-
p000000010p000030302-shortened.bz2`, a shortened 2016 English Wikipedia dump (206 pages: Anarchism,
Autism, Albedo, Aristotle, ...). Wikipedia text is licensed CC BY-SA 3.0 (attribution: the Wikipedia
contributors; page titles are kept in the manifest); the gensim wheel itself is LGPL-2.1. The wheel is
fetched once with `pip download --no-deps` for one pinned platform (so the same file and sha256 on
every machine), never installed or imported; the member is read from the zip.

Extraction: the XML is parsed with the standard library; main-namespace pages that are not
redirects are kept in dump order; the wiki markup is reduced to plain text (`clean_wikitext`:
comments, references, templates, tables, files and categories dropped; links become their label;
bold / italic quotes, HTML tags and bullets removed; headings kept as lines; the text stops at the
first "See also" / "References" / "External links" / "Notes" / "Further reading" / "Bibliography"
heading). Every 10th article (index % 10 == 9) is the calibration split, the other nine tenths the
evaluation split; the texts are cached under `<cache>/data/wikipedia/`.
"""

from __future__ import annotations

import bz2
import html
import io
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from prune_core import paths
from prune_core.datasources import (
    DOC_SEPARATOR,
    Split,
    emit,
    read_text_cache,
    text_cache_present,
    write_text_cache,
)
from prune_core.datasources.wheels import download_wheel
from prune_core.errors import RunFailed
from prune_core.events import EventSink

KEY = "wikipedia"
PACKAGE = "gensim"
VERSION = "4.4.0"
PLATFORM = "manylinux_2_28_x86_64"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIBRATION_EVERY = 10  # article i is calibration when i % 10 == 9
MIN_ARTICLES = 50

DESCRIPTION = ("English Wikipedia articles (2016 dump sample shipped in PyPI gensim==4.4.0; text CC BY-SA 3.0); "
               "an other-domain evaluation text: evaluation = 9 of every 10 articles")

_PIP_TIMEOUT_S = 600
_STOP_HEADINGS = {"see also", "references", "external links", "notes", "further reading", "bibliography",
                  "sources", "footnotes", "citations"}


def wheel_path() -> Path:
    return paths.wheels_dir() / WHEEL_NAME


def is_cached() -> bool:
    return text_cache_present(KEY) or wheel_path().is_file()


def load(split: Split, on_event: EventSink | None = None) -> str:
    """The plain text of one split, building the cache from the wheel the first time."""
    texts = read_text_cache(KEY)
    if texts is None:
        texts = _build_cache(on_event)
    return texts[split]


# ---------------------------------------------------------------------------------------------
# Wiki markup → text
# ---------------------------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)  # innermost {{...}} (single braces allowed)
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_TAG = re.compile(r"<[^<>]+>")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_DROP_PREFIX = re.compile(r"^(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", re.I)
_MANY_BLANKS = re.compile(r"\n{3,}")


def _link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _DROP_PREFIX.match(inner.strip()):
        return ""
    return inner.split("|")[-1]


def _until_stable(pattern: re.Pattern[str], repl: str | object, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)  # type: ignore[arg-type]
        if new == text:
            return new
        text = new


def clean_wikitext(markup: str) -> str:
    """Plain text of one article's wiki markup (see the module docstring)."""
    text = html.unescape(markup)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _until_stable(_LINK, _link, text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            title = heading.group(2).strip()
            if title.lower() in _STOP_HEADINGS:
                break
            out.extend(["", title, ""])
            continue
        line = line.lstrip("*#:;").strip()
        if line.startswith(("{|", "|", "!", "}}", "{{")):
            continue
        out.append(" ".join(line.split()))
    return _MANY_BLANKS.sub("\n\n", "\n".join(out)).strip() + "\n"


def read_articles(wheel: Path) -> list[tuple[str, str]]:
    """(title, wiki markup) of the main-namespace, non-redirect pages in the wheel's dump, in order."""
    with zipfile.ZipFile(wheel) as zf:
        data = bz2.decompress(zf.read(MEMBER))
    articles: list[tuple[str, str]] = []
    for _event, elem in ElementTree.iterparse(io.BytesIO(data)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        ns = fields.get("ns")
        revision = fields.get("revision")
        if ns is not None and (ns.text or "").strip() == "0" and "redirect" not in fields and revision is not None:
            body = next((c.text or "" for c in revision if c.tag.rsplit("}", 1)[-1] == "text"), "")
            if body and not body.lstrip().upper().startswith("#REDIRECT"):
                articles.append(((fields["title"].text or "").strip(), body))
        elem.clear()
    return articles


def split_articles(wheel: Path, on_event: EventSink | None = None) -> tuple[dict[Split, str], dict[str, object]]:
    """Clean every article and assemble the two splits; returns (texts, manifest info)."""
    articles = read_articles(wheel)
    parts: dict[Split, list[str]] = {"calibration": [], "evaluation": []}
    titles: dict[Split, list[str]] = {"calibration": [], "evaluation": []}
    for i, (title, markup) in enumerate(articles):
        text = clean_wikitext(markup).strip()
        if not text:
            continue
        split: Split = "calibration" if i % CALIBRATION_EVERY == CALIBRATION_EVERY - 1 else "evaluation"
        parts[split].append(f"{title}\n\n{text}")
        titles[split].append(title)
        emit(on_event, i + 1, len(articles), "articles", f"extracting {title}")
    if len(titles["evaluation"]) + len(titles["calibration"]) < MIN_ARTICLES:
        raise RunFailed(f"the {WHEEL_NAME} wheel yielded only {len(articles)} articles",
                        f"delete {wheel} and run again to download it afresh")
    texts: dict[Split, str] = {s: DOC_SEPARATOR.join(parts[s]) + "\n" for s in ("calibration", "evaluation")}
    info: dict[str, object] = {
        "source": f"pypi:{PACKAGE}=={VERSION} ({PLATFORM} wheel) member {MEMBER}",
        "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256,
        "license": "text: CC BY-SA 3.0 (Wikipedia contributors); wheel: LGPL-2.1",
        "articles": titles,
    }
    return texts, info


def _build_cache(on_event: EventSink | None) -> dict[Split, str]:
    wheel = fetch_wheel(on_event)
    texts, info = split_articles(wheel, on_event)
    write_text_cache(KEY, texts, info)
    return texts


# ---------------------------------------------------------------------------------------------
# Fetching the wheel
# ---------------------------------------------------------------------------------------------

def fetch_wheel(on_event: EventSink | None = None) -> Path:
    """Path of the verified wheel in the wheels cache, downloading it with pip if needed."""
    target = wheel_path()
    fix = (f"run once with network access to PyPI, or download {WHEEL_NAME} yourself and put it in "
           f"{target.parent}, or evaluate on a local text file (.txt, .jsonl, .parquet)")
    return download_wheel(f"{PACKAGE}=={VERSION}", WHEEL_NAME, WHEEL_SHA256, target, what="Wikipedia sample",
                          fix=fix, extra_args=("--platform", PLATFORM, "--python-version", "3.11",
                                               "--implementation", "cp", "--abi", "cp311"),
                          timeout_s=_PIP_TIMEOUT_S, on_event=on_event)


__all__ = ["DESCRIPTION", "KEY", "clean_wikitext", "fetch_wheel", "is_cached", "load", "read_articles",
           "split_articles", "wheel_path"]
