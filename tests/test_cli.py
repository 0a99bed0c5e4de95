"""The `jaxcryo` command line end to end at tiny size: simulate -> reconstruct -> fsc, resume, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile

from jaxcryo import cli
from jaxcryo.fsc import fsc
from jaxcryo.io import make_table, write_particles, write_stack

BOX, N, PX = 16, 160, 3.0
FAST = ["--method", "psgd", "--epochs", "3", "--batch-size", "64", "--quiet", "--wiener-after", "0"]


def run(argv, capsys):
    """cli.main(argv) -> (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    assert cli.main(["simulate", "--out", str(folder), "--n-images", str(N), "--box", str(BOX),
                     "--pixel-size", str(PX), "--snr", "2", "--quiet"]) == 0
    return folder


@pytest.fixture(scope="module")
def uninterrupted(sim, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    assert cli.main(["reconstruct", str(sim / "particles.star"), "--out", str(folder / "map.mrc"), *FAST]) == 0
    return folder


def test_simulate_writes_relion_files(sim):
    assert sorted(p.name for p in sim.iterdir()) == ["particles.mrcs", "particles.star", "truth.mrc"]
    star = starfile.read(sim / "particles.star")
    assert len(star["particles"]) == N and float(star["optics"]["rlnImagePixelSize"][0]) == PX
    assert {"rlnAngleRot", "rlnOriginXAngst", "rlnDefocusU"} <= set(star["particles"].columns)
    with mrcfile.open(sim / "particles.mrcs") as m:
        assert m.data.shape == (N, BOX, BOX) and abs(float(m.voxel_size.x) - PX) < 1e-4


def test_reconstruct_and_fsc_end_to_end(sim, uninterrupted, capsys):
    names = {p.name for p in uninterrupted.iterdir()}
    assert {"map.mrc", "map_half1.mrc", "map_half2.mrc", "map_fsc.png", "history.json", "map.ckpt.npz"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    history = json.loads((uninterrupted / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3] and len(history["loss"]) == len(history["seconds"]) == 3
    assert history["loss"][-1] < history["loss"][0]
    assert len(history["fsc"]) == BOX // 2 + 1 and history["resolution_angstrom"] >= 2 * PX
    with mrcfile.open(uninterrupted / "map.mrc") as m:
        assert m.data.shape == (BOX,) * 3 and abs(float(m.voxel_size.x) - PX) < 1e-4
        volume = m.data.copy()
    truth = mrcfile.read(sim / "truth.mrc")
    # 80 noisy CTF-modulated images a half-set and 3 epochs: a rough but clearly right map.
    assert np.corrcoef(volume.ravel(), truth.ravel())[0, 1] > 0.5
    assert fsc(volume, truth)[1:BOX // 2 - 1].mean() > 0.5

    code, out, _ = run(["fsc", uninterrupted / "map_half1.mrc", uninterrupted / "map_half2.mrc",
                        "--plot", uninterrupted / "f.png", "--json", uninterrupted / "f.json"], capsys)
    assert code == 0 and "at FSC 0.143" in out.splitlines()[-1]
    saved = json.loads((uninterrupted / "f.json").read_text())
    assert saved["resolution_fsc_0.143"] == pytest.approx(history["resolution_angstrom"], rel=1e-6)
    assert (uninterrupted / "f.png").stat().st_size > 1000


def test_resumed_run_equals_uninterrupted(sim, uninterrupted, tmp_path, capsys):
    out = tmp_path / "map.mrc"
    star = sim / "particles.star"
    first = [a if a != "3" else "1" for a in FAST]
    assert run(["reconstruct", star, "--out", out, *first], capsys)[0] == 0
    assert json.loads((tmp_path / "history.json").read_text())["epoch"] == [1]
    # Other settings with --resume: refused, nothing touched.
    code, _, err = run(["reconstruct", star, "--out", out, *FAST, "--resume", "--lam", "0.1"], capsys)
    assert code == 2 and "different settings (lam)" in err
    code, _, err = run(["reconstruct", star, "--out", out, *FAST, "--resume"], capsys)
    assert code == 0 and "resuming" in err and "epoch 1" in err
    history = json.loads((tmp_path / "history.json").read_text())
    reference = json.loads((uninterrupted / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    np.testing.assert_allclose(history["loss"], reference["loss"], rtol=1e-5)
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc"):
        a, b = mrcfile.read(tmp_path / name), mrcfile.read(uninterrupted / name)
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())


def test_resume_without_checkpoint_is_an_error(sim, tmp_path, capsys):
    code, _, err = run(["reconstruct", sim / "particles.star", "--out", tmp_path / "m.mrc", "--resume"], capsys)
    assert code == 2 and "no checkpoint" in err and not list(tmp_path.iterdir())


def test_project_matches_relion_project(sim, tmp_path, capsys):
    if shutil.which("relion_project") is None:
        pytest.skip("relion_project not installed")
    star = tmp_path / "poses.star"
    table = starfile.read(sim / "particles.star")
    table["particles"] = table["particles"].iloc[:24]
    starfile.write(table, star)
    shutil.copy(sim / "particles.mrcs", tmp_path / "particles.mrcs")
    shutil.copy(sim / "truth.mrc", tmp_path / "truth.mrc")
    code, _, _ = run(["project", tmp_path / "truth.mrc", "--star", star, "--out", tmp_path / "ours.mrcs", "--quiet"],
                     capsys)
    assert code == 0
    subprocess.run(["relion_project", "--i", "truth.mrc", "--ang", "poses.star", "--o", "relion", "--ctf"],
                   cwd=tmp_path, check=True, capture_output=True)
    ours, theirs = mrcfile.read(tmp_path / "ours.mrcs"), mrcfile.read(tmp_path / "relion.mrcs")
    assert ours.shape == theirs.shape == (24, BOX, BOX)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]
    assert min(corr) >= 0.99, corr


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def good(tmp_path):
    """A valid little particle set: (folder, star path, images)."""
    n, box = 6, 8
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    write_stack(tmp_path / "p.mrcs", images, pixel_size_angstrom=2.0)
    table = make_table(stack_paths=str(tmp_path / "p.mrcs"), stack_indices=np.arange(n), pixel_size_angstrom=2.0,
                       euler_deg=rng.uniform(0, 90, (n, 3)), defocus_u_angstrom=15000.0, box_size=box)
    write_particles(tmp_path / "p.star", table)
    return tmp_path, tmp_path / "p.star", images


def _edit_star(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _break(kind, folder, star, images):
    """Make input `kind` bad; return the text the message must contain."""
    if kind == "missing star":
        star.unlink()
        return "file not found"
    if kind == "missing column":
        data = starfile.read(star)
        data["particles"] = data["particles"].drop(columns=["rlnAngleRot"])
        starfile.write(data, star)
        return "rlnAngleRot"
    if kind == "missing stack":
        (folder / "p.mrcs").unlink()
        return "file not found"
    if kind == "row past end":
        _edit_star(star, "6@", "60@")
        return "points past the end"
    if kind == "box differs from optics":
        _edit_star(star, " 8 2\n", " 10 2\n")
        return "rlnImageSize"
    if kind == "non-square images":
        with mrcfile.new(folder / "p.mrcs", overwrite=True) as m:
            m.set_data(np.zeros((6, 8, 10), np.float32))
        return "square"
    if kind == "nan pixels":
        images = images.copy()
        images[3, 2, 2] = np.nan
        write_stack(folder / "p.mrcs", images, pixel_size_angstrom=2.0)
        return "NaN or Inf"
    if kind == "inf pixels":
        images = images.copy()
        images[5, 0, 0] = np.inf
        write_stack(folder / "p.mrcs", images, pixel_size_angstrom=2.0)
        return "NaN or Inf"
    if kind == "unreadable mrc":
        (folder / "p.mrcs").write_bytes(b"this is not an MRC file" * 10)
        return "unreadable"
    if kind == "empty star":
        star.write_text("")
        return str(star)
    if kind == "star without rows":
        data = starfile.read(star)
        data["particles"] = data["particles"].iloc[:0]
        starfile.write(data, star)
        return "no particles"
    raise AssertionError(kind)


BAD = ["missing star", "missing column", "missing stack", "row past end", "box differs from optics",
       "non-square images", "nan pixels", "inf pixels", "unreadable mrc", "empty star", "star without rows"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile warns while the test writes NaN/Inf
@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_clear_message(kind, good, capsys):
    folder, star, images = good
    expected = _break(kind, folder, star, images)
    out_dir = folder / "out"
    out_dir.mkdir()
    code, _, err = run(["reconstruct", star, "--out", out_dir / "map.mrc", "--quiet"], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxcryo reconstruct: error: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert ("p.star" in lines[0]) or ("p.mrcs" in lines[0]), lines[0]
    assert not list(out_dir.iterdir())  # nothing half-written
    print(f"{kind}: {lines[0]}")


def test_missing_output_folder(good, capsys):
    _, star, _ = good
    code, _, err = run(["reconstruct", star, "--out", "/nonexistent/folder/map.mrc"], capsys)
    assert code == 2 and "does not exist" in err


def test_unknown_option_value_exits_2(good, capsys):
    _, star, _ = good
    with pytest.raises(SystemExit) as exc:
        cli.main(["reconstruct", str(star), "--out", "m.mrc", "--method", "newton"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["reconstruct", str(star), "--out", "m.mrc", "--epochs", "0"])
    assert exc.value.code == 2


def test_memory_limit_refuses_before_work(good, capsys):
    folder, star, _ = good
    code, _, err = run(["reconstruct", star, "--out", folder / "m.mrc", "--max-memory-gb", "1e-9", "--quiet"],
                       capsys)
    assert code == 2 and "above the limit" in err and "--max-memory-gb" in err
    assert not (folder / "m.mrc").exists()


def test_fsc_shape_mismatch_and_missing_pixel_size(tmp_path, capsys):
    from jaxcryo.io import write_map
    write_map(tmp_path / "a.mrc", np.zeros((8, 8, 8)), voxel_size_angstrom=2.0)
    write_map(tmp_path / "b.mrc", np.zeros((6, 6, 6)), voxel_size_angstrom=2.0)
    write_map(tmp_path / "c.mrc", np.zeros((8, 8, 8)), voxel_size_angstrom=0.0)
    code, _, err = run(["fsc", tmp_path / "a.mrc", tmp_path / "b.mrc", "--plot", ""], capsys)
    assert code == 2 and "b.mrc" in err and "differs" in err
    code, _, err = run(["fsc", tmp_path / "c.mrc", tmp_path / "c.mrc", "--plot", ""], capsys)
    assert code == 2 and "--pixel-size" in err


def test_console_script_prints_no_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "jaxcryo")
    if not os.path.exists(script):
        pytest.skip("console script not installed")
    proc = subprocess.run([script, "reconstruct", str(tmp_path / "none.star"), "--out", str(tmp_path / "m.mrc")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"jaxcryo reconstruct: error: {tmp_path / 'none.star'}: file not found"


def test_help_lists_defaults_and_units(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reconstruct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--method", "--epochs", "--batch-size", "--interpolation", "--lam", "--seed", "--no-halves",
                   "--resume", "--quiet", "--max-memory-gb"):
        assert option in text
    assert "normal (default in memory" in text and "(default: trilinear)" in text


def test_streaming_reconstructs_and_resumes(sim, uninterrupted, tmp_path, capsys):
    """--stream sweeps chunks read from disk each epoch; a killed streamed run resumes exactly."""
    star = sim / "particles.star"
    stream = ["--stream", "--chunk-size", "100"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    assert run(["reconstruct", star, "--out", whole / "map.mrc", *FAST, *stream], capsys)[0] == 0
    history = json.loads((whole / "history.json").read_text())
    in_memory = json.loads((uninterrupted / "history.json").read_text())
    assert history["settings"]["mode"] == "stream 100"
    # Same objective, different minibatches, and iterates averaged per chunk (here one step a
    # chunk) rather than per epoch: losses agree to optimisation noise plus that difference.
    np.testing.assert_allclose(history["loss"], in_memory["loss"], rtol=0.1)
    truth = mrcfile.read(sim / "truth.mrc")
    assert fsc(mrcfile.read(whole / "map.mrc"), truth)[1:BOX // 2 - 1].mean() > 0.5

    first = [a if a != "3" else "1" for a in FAST]
    assert run(["reconstruct", star, "--out", parts / "map.mrc", *first, *stream], capsys)[0] == 0
    # Rerunning the same command without --stream or --resume picks the streamed checkpoint up.
    code, _, err = run(["reconstruct", star, "--out", parts / "map.mrc", *FAST, "--chunk-size", "100"], capsys)
    assert code == 0 and "resuming" in err
    a, b = mrcfile.read(parts / "map.mrc"), mrcfile.read(whole / "map.mrc")
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())


def test_two_processes_write_the_map_of_one(sim, tmp_path):
    """`jaxcryo reconstruct --coordinator ... --num-processes 2 --process-id i` on 127.0.0.1:
    each process reads its share of the rows, process 0 writes the same map as one process."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    star = str(sim / "particles.star")
    opts = ["--method", "psgd", "--epochs", "2", "--batch-size", "64", "--quiet", "--wiener-after", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    exe = [sys.executable, "-m", "jaxcryo.cli", "reconstruct", star]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = subprocess.run(exe + ["--out", str(one / "map.mrc"), *opts], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    procs = [subprocess.Popen(exe + ["--out", str(two / "map.mrc"), *opts, "--coordinator", f"127.0.0.1:{port}",
                                     "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # only process 0 reports and writes
    a, b = mrcfile.read(one / "map.mrc"), mrcfile.read(two / "map.mrc")
    np.testing.assert_allclose(b, a, atol=2e-5 * np.abs(a).max())
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=2e-6)
