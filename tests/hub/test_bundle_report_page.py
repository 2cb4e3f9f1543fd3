"""The Bundles page's compile report, in a real Chromium, for an int8 bundle that mixed precision rescued: the
candidates it tried, the layers it kept in float, and the class names."""

import json
from pathlib import Path

from browser import chromium, open_bundle_report, open_logged_in
from helpers import compile_args, outlier_classifier, outlier_samples
from hub_helpers import signing_keys

from edgekit.hub.auth import create_token

NAMES = ["north", "east", "south", "west"]


def test_the_report_shows_the_layers_mixed_precision_kept_in_float(cli, make_hub, tmp_path: Path) -> None:
    private, public = signing_keys(tmp_path / "keys")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(NAMES))
    bundle = tmp_path / "outliers.ekb"
    model, data = outlier_classifier(tmp_path / "outliers.onnx"), outlier_samples(tmp_path / "x.npz")
    int8 = ("--precision", "int8", "--backend", "onnxruntime", "--calibration", data)
    result = cli(*compile_args(model, "x86-64-avx512", *int8, "--sign-key", private, "--labels", labels, out=bundle))
    assert result.exit_code == 0, result.output
    hub = make_hub(trust_key=public)
    record, _ = hub.registry.add(bundle, "test")

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        token = create_token(hub.sessions, "report-reader", "test", scope="read")
        open_logged_in(page, hub.http_url + "/bundles", token, "bundles")
        open_bundle_report(page, record.id)
        row = page.eval_on_selector_all("#candidates tbody tr:first-child td", "ts => ts.map(t => t.textContent)")
        assert row[:3] == ["onnxruntime", "int8", "chosen"], row
        assert row[9].startswith("1 of 2 layers in float"), row  # the summary; the layer's name is under it
        page.click("#candidates tbody tr:first-child details summary")
        assert page.is_visible("#candidates tbody tr:first-child details code")
        assert page.text_content("#candidates tbody tr:first-child details code") == "fc1"
        assert page.eval_on_selector_all("#class-names li", "items => items.map(i => i.textContent)") == NAMES
        page.close()
