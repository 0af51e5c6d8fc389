"""Released-weights download and loading, against an HTTP server on 127.0.0.1 serving test files."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import threading

import mindspore as ms
import numpy as np
import pytest

import models
from models import pretrained, registry
from models.weights import WeightsError, load_weights
from resgarden.base.download import DownloadError, download_verified


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate: set[str] = set()

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        name = self.path.lstrip("/")
        if name in self.truncate:
            data = open(os.path.join(self.directory, name), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # connection closes early
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on a free loopback port; yields (www folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(www), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    _Handler.truncate = set()


@pytest.fixture(scope="module")
def resnet18_state():
    """A resnet18 parameter dict with random weights (name -> numpy)."""
    net = models.create_model("resnet18")
    return {k: v.asnumpy() for k, v in net.parameters_dict().items()}


def _publish(www, state: dict, stem: str = "resnet18", wrong_hash: bool = False) -> str:
    """Write `state` as a checkpoint named `<stem>-<sha256[:8]>.ckpt`; return the file name."""
    tmp = www / "tmp.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in state.items()], str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"{stem}-{'00000000' if wrong_hash else digest}.ckpt"
    tmp.rename(www / name)
    return name


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(folder))
    return folder


def _point_entry(monkeypatch, url: str, name: str = "resnet18") -> None:
    card = models.model_card(name)
    monkeypatch.setitem(registry._CARDS, name, dataclasses.replace(card, weights=dataclasses.replace(card.weights, url=url)))


@pytest.mark.slow
def test_good_hash_downloads_verifies_loads_and_reuses_cache(server, cache, monkeypatch, resnet18_state):
    www, base = server
    filename = _publish(www, resnet18_state)
    _point_entry(monkeypatch, f"{base}/{filename}")
    net = models.create_model("resnet18", pretrained=True)
    np.testing.assert_array_equal(net.conv1.weight.asnumpy(), resnet18_state["conv1.weight"])
    np.testing.assert_array_equal(net.classifier.bias.asnumpy(), resnet18_state["classifier.bias"])
    assert sorted(os.listdir(cache)) == [filename]
    (www / filename).unlink()  # server no longer has it: the verified cache copy is used
    net2 = models.create_model("resnet18", pretrained=True)
    np.testing.assert_array_equal(net2.layer4[1].bn2.gamma.asnumpy(), resnet18_state["layer4.1.bn2.gamma"])


def test_bad_hash_fails_and_leaves_nothing(server, cache, monkeypatch, resnet18_state):
    www, base = server
    filename = _publish(www, resnet18_state, wrong_hash=True)
    _point_entry(monkeypatch, f"{base}/{filename}")
    with pytest.raises(WeightsError, match="sha256 of .* expected 00000000.*deleted"):
        models.create_model("resnet18", pretrained=True)
    assert os.listdir(cache) == []


def test_corrupt_cached_copy_is_replaced(server, cache, monkeypatch, resnet18_state):
    www, base = server
    filename = _publish(www, resnet18_state)
    cache.mkdir()
    (cache / filename).write_bytes(b"garbage")
    path = download_verified(f"{base}/{filename}", filename.split("-")[1][:8], str(cache))
    assert hashlib.sha256(open(path, "rb").read()).hexdigest().startswith(filename.split("-")[1][:8])


def test_truncated_download_fails_and_leaves_nothing(server, cache, monkeypatch, resnet18_state):
    www, base = server
    filename = _publish(www, resnet18_state)
    _Handler.truncate = {filename}
    _point_entry(monkeypatch, f"{base}/{filename}")
    with pytest.raises(WeightsError, match="truncated|cannot download"):
        models.create_model("resnet18", pretrained=True)
    assert os.listdir(cache) == []


def test_offline_names_url_and_manual_path(cache, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-1e65cd21.ckpt"
    _point_entry(monkeypatch, url)
    with pytest.raises(WeightsError) as err:
        models.create_model("resnet18", pretrained=True)
    message = str(err.value)
    assert url in message and str(cache / "resnet18-1e65cd21.ckpt") in message
    assert not cache.exists() or os.listdir(cache) == []


def test_plain_http_to_other_hosts_is_refused(cache):
    with pytest.raises(DownloadError, match="HTTPS only"):
        download_verified("http://example.com/resnet18-1e65cd21.ckpt", "1e65cd21", str(cache))


def test_model_without_released_weights_says_so():
    with pytest.raises(WeightsError, match="res2net50_14w_8s has no released MindSpore weights"):
        models.create_model("res2net50_14w_8s", pretrained=True)


def test_1001_class_release_is_cut_to_1000(server, cache, monkeypatch, resnet18_state):
    www, base = server
    state = dict(resnet18_state)
    state["classifier.weight"] = np.random.RandomState(0).randn(1001, 512).astype(np.float32)
    state["classifier.bias"] = np.arange(1001, dtype=np.float32)
    _point_entry(monkeypatch, f"{base}/{_publish(www, state)}")
    net = models.create_model("resnet18", pretrained=True)
    np.testing.assert_array_equal(net.classifier.weight.asnumpy(), state["classifier.weight"][:1000])
    np.testing.assert_array_equal(net.classifier.bias.asnumpy(), np.arange(1000, dtype=np.float32))


def test_other_num_classes_replaces_head_and_keeps_backbone(server, cache, monkeypatch, resnet18_state):
    www, base = server
    _point_entry(monkeypatch, f"{base}/{_publish(www, resnet18_state)}")
    net = models.create_model("resnet18", pretrained=True, num_classes=10)
    assert net.classifier.weight.shape == (10, 512)
    np.testing.assert_array_equal(net.layer3[0].conv1.weight.asnumpy(), resnet18_state["layer3.0.conv1.weight"])


def test_checkpoint_path_errors_are_one_clear_line(tmp_path, resnet18_state):
    with pytest.raises(WeightsError, match="checkpoint not found"):
        models.create_model("resnet18", checkpoint_path=str(tmp_path / "nope.ckpt"))
    good = tmp_path / "good.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in resnet18_state.items()], str(good))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot read checkpoint .*truncated.ckpt"):
        models.create_model("resnet18", checkpoint_path=str(truncated))
    with pytest.raises(WeightsError) as err:  # resnet18 weights into resnet34: missing + shape table
        models.create_model("resnet34", checkpoint_path=str(good))
    assert "missing     layer1.2.conv1.weight" in str(err.value)


def test_shape_mismatch_is_reported_in_the_table(resnet18_state):
    net = models.create_model("resnet18", num_classes=10)
    with pytest.raises(WeightsError, match=r"shape       classifier.weight: checkpoint \[1000, 512\] vs model \[10, 512\]"):
        load_weights(net, resnet18_state)
    report = load_weights(net, resnet18_state, strict=False)
    assert set(report.mismatched) == {"classifier.weight", "classifier.bias"}
    assert len(report.loaded) == len(resnet18_state) - 2


@pytest.mark.slow
def test_weights_cache_flag_of_the_entry_points(server, tmp_path, monkeypatch, resnet18_state, capsys):
    import validate as validate_entry
    from tests.helpers import write_imagenet_layout

    www, base = server
    filename = _publish(www, resnet18_state)
    _point_entry(monkeypatch, f"{base}/{filename}")
    monkeypatch.setenv(pretrained.CACHE_ENV, "unused")  # recorded, so the flag's setting is undone afterwards
    monkeypatch.delenv(pretrained.CACHE_ENV)
    write_imagenet_layout(str(tmp_path / "data"), per_class=1, size=36)
    flag_cache = tmp_path / "flag_cache"
    assert validate_entry.main(["--model=resnet18", "--pretrained", f"--data_dir={tmp_path / 'data'}",
                                f"--weights_cache={flag_cache}", "--image_size=32"]) == 0
    assert os.listdir(flag_cache) == [filename]
    assert "images 4" in capsys.readouterr().out


@pytest.mark.slow
def test_validate_scores_every_model_a_pattern_matches(server, cache, monkeypatch, resnet18_state, tmp_path, capsys):
    """`validate.py --model='resnet[13][84]' --pretrained`: resnet18 and resnet34, one after the other;
    resnet34's download fails its hash: resnet18's line is printed, then one error naming resnet34."""
    import validate as validate_entry
    from tests.helpers import write_imagenet_layout

    www, base = server
    _point_entry(monkeypatch, f"{base}/{_publish(www, resnet18_state)}")
    (www / "resnet34-00000000.ckpt").write_bytes(b"not these weights")
    _point_entry(monkeypatch, f"{base}/resnet34-00000000.ckpt", name="resnet34")
    data = tmp_path / "imagenet"
    write_imagenet_layout(str(data), per_class=3, size=36)
    table = tmp_path / "results.csv"
    args = ["--model=resnet[13][84]", "--pretrained", "--dataset=imagenet", f"--data_dir={data}", "--image_size=32",
            "--crop_pct=1.0", "--num_parallel_workers=1", f"--results_csv={table}"]
    assert validate_entry.main(args) == 2
    captured = capsys.readouterr()
    assert "resnet18: top-1" in captured.out
    assert captured.err.startswith("validate.py: error: 1 of 2 models failed: resnet34 (sha256 of")
    assert [row.split(",")[0] for row in table.read_text().splitlines()[1:]] == ["resnet18"]
