"""The report folder's ``index.html`` is one self-contained page that a real browser shows
with every figure: headless Chromium loads it, a screenshot is kept, and every image in the
page must have decoded (``naturalWidth > 0``)."""

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

import test_plots_report
from colaprob.diagnostics import html_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# Appended to a copy of the page: after load, list every image's decoded size in the DOM.
IMAGE_CHECK = """<script>window.addEventListener("load", function () {
  var lines = [];
  document.querySelectorAll("img").forEach(function (img) {
    lines.push(img.alt + " " + img.complete + " " + img.naturalWidth + " " + img.naturalHeight);
  });
  var pre = document.createElement("pre"); pre.id = "image-check"; pre.textContent = lines.join("\\n");
  document.body.appendChild(pre);
});</script>"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return test_plots_report.small_report(tmp_path_factory)[0]


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def decoded_images(page: Path, tmp_path: Path) -> dict[str, tuple[int, int]]:
    """``alt -> (naturalWidth, naturalHeight)`` of every image, as Chromium decoded them."""
    probe = tmp_path / f"{page.stem}-check.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = chromium(probe, tmp_path / f"profile-{page.stem}", "--virtual-time-budget=10000", "--dump-dom").stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
    assert found, "the page never finished loading"
    sizes = {}
    for line in found.group(1).strip().splitlines():
        alt, complete, width, height = line.split()
        sizes[alt] = (int(width), int(height)) if complete == "true" else (0, 0)
    return sizes


def test_the_page_is_self_contained_and_holds_the_summary_tables_and_figures(folder):
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched
    assert page.count("<table>") == 3 and "<h2>Where the bound goes</h2>" in page
    figures = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in figures] == [p.stem for p in sorted(folder.glob("*.png"), key=lambda p: page.index(p.stem + ".png"))]
    for name, data in figures:  # exactly the PNG written beside it
        assert base64.b64decode(data) == (folder / f"{name}.png").read_bytes()


def test_markdown_text_is_escaped():
    html = html_page.markdown_to_html("# a <b>\n\n| x | y \\| z |\n|---|---|\n| <i> | `c` |\n\n- item & more")
    assert "<h1>a &lt;b&gt;</h1>" in html and "<th>y | z</th>" in html
    assert "<td>&lt;i&gt;</td><td><code>c</code></td>" in html and "<li>item &amp; more</li>" in html


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium) for the headless-browser check")
def test_headless_chromium_shows_every_figure(folder, tmp_path):
    artifacts = Path(os.environ.get("COLAPROB_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "report-index.png"
    chromium(folder / "index.html", tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1280,6000")
    print(f"screenshot of index.html: {screenshot}")

    sizes = decoded_images(folder / "index.html", tmp_path)
    for png in folder.glob("*.png"):
        height, width = matplotlib.image.imread(png).shape[:2]
        assert sizes.pop(png.stem) == (width, height), f"{png.stem} did not render at its size"
    assert not sizes, f"images in the page without a figure file: {sorted(sizes)}"

    shot = matplotlib.image.imread(screenshot)
    assert shot.shape[:2] == (6000, 1280)
    assert shot[..., :3].std() > 0.05, "the screenshot is blank"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium) for the headless-browser check")
def test_the_check_sees_a_figure_that_does_not_render(folder, tmp_path):
    broken = tmp_path / "broken.html"
    page = (folder / "index.html").read_text(encoding="utf-8")
    broken.write_text(re.sub(r'(alt="decomposition" src="data:image/png;base64,)[^"]+', r"\1bm90IGEgcG5n", page), encoding="utf-8")
    sizes = decoded_images(broken, tmp_path)
    assert sizes.pop("decomposition") == (0, 0)
    assert all(width > 0 for width, _ in sizes.values())
