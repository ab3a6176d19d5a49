"""The HTML report in headless Chromium: a wide search table scrolls in its own box, the page does not."""

from __future__ import annotations

import re
import subprocess

import pytest

from scalelab.pipeline.report import write_report

pytestmark = pytest.mark.integration

PROBE = """<script>
window.addEventListener("load", () => {
  const boxes = [...document.querySelectorAll(".scroll")];
  const box = boxes.reduce((a, b) => (b.scrollWidth > a.scrollWidth ? b : a));  // the search table
  document.body.insertAdjacentHTML("beforeend", `<pre id="probe">page ${document.documentElement.scrollWidth}
view ${window.innerWidth} box ${box.clientWidth} table ${box.scrollWidth}</pre>`);
});
</script></body>"""


def test_wide_search_table_scrolls_inside_its_box(tmp_path, headless_chromium):
    chromium = headless_chromium(tmp_path / "chrome")
    if chromium is None:
        pytest.skip("chromium is not installed (make setup installs it)")
    keys = [f"model.searched_key_number_{i}" for i in range(14)]
    rows = [
        {
            "trial_id": f"trial_{i:05d}_0123456789",
            "status": "completed",
            "val_acc": 0.9,
            **{k: [32, 64, 128, 256] for k in keys},
        }
        for i in range(8)
    ]
    html_path, _ = write_report({"title": "t", "search": {"rows": rows}, "summary": {"a": 1}}, tmp_path / "r")
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE))
    out = subprocess.run(
        [*chromium, "--window-size=800,600", "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    m = re.search(r"page (\d+)\s+view (\d+) box (\d+) table (\d+)", out)
    assert m, out[-2000:]
    page, view, box, table = map(int, m.groups())
    assert table > box  # the table is wider than its box ...
    assert page <= view  # ... and scrolls there: the page itself never runs off the right edge
