"""RELION STAR reading/writing: both dialects, path resolution, and every bad input."""

import os

import numpy as np
import pytest

from jaxcryo.io import InputError, ParticleTable, make_table, read_particles, write_particles
from jaxcryo.io.errors import atomic_output

STAR_30 = """
data_

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginX #5
_rlnOriginY #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnVoltage #10
_rlnSphericalAberration #11
_rlnAmplitudeContrast #12
_rlnMagnification #13
_rlnDetectorPixelSize #14
1@stack.mrcs 10.0 20.0 30.0 2.0 -1.0 15000 14000 45 300 2.7 0.1 50000 5.0
2@stack.mrcs 11.0 21.0 31.0 -3.0 0.5 16000 15500 10 300 2.7 0.1 50000 5.0
"""

STAR_31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnAmplitudeContrast #3
_rlnSphericalAberration #4
_rlnVoltage #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 opticsGroup1 0.1 2.7 300.0 1.0 64 2
2 opticsGroup2 0.07 2.0 200.0 1.5 64 2

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnPhaseShift #10
_rlnCtfBfactor #11
_rlnOpticsGroup #12
000001@Particles/a.mrcs 1.0 2.0 3.0 1.5 -2.5 10000 9000 5 0 0 1
000002@Particles/a.mrcs 4.0 5.0 6.0 0.0 3.0 20000 19000 6 10 50 2
000007@Particles/b.mrcs 7.0 8.0 9.0 -1.0 1.0 30000 29000 7 0 0 1
"""


def _write(tmp_path, text, name="particles.star"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _random_table(tmp_path, n=7, seed=0):
    rng = np.random.default_rng(seed)
    inside = tmp_path / "Extract" / "stack.mrcs"
    outside = tmp_path.parent / f"{tmp_path.name}_elsewhere" / "other.mrcs"
    return make_table(
        stack_paths=np.where(np.arange(n) % 3 == 0, str(outside), str(inside)),
        stack_indices=rng.integers(0, 100, n),
        pixel_size_angstrom=np.where(np.arange(n) % 2 == 0, 1.1, 2.3),
        optics_group=np.where(np.arange(n) % 2 == 0, 1, 2),
        voltage_kv=np.where(np.arange(n) % 2 == 0, 300.0, 200.0),
        box_size=64,
        euler_deg=rng.uniform(-180, 180, (n, 3)),
        shifts_angstrom=rng.normal(0, 3, (n, 2)),
        defocus_u_angstrom=rng.uniform(5000, 30000, n),
        defocus_v_angstrom=rng.uniform(5000, 30000, n),
        defocus_angle_deg=rng.uniform(-90, 90, n),
        phase_shift_deg=rng.uniform(0, 90, n),
        ctf_bfactor=rng.uniform(0, 100, n),
        amplitude_contrast=0.07,
    )


ARRAY_FIELDS = [
    "stack_paths", "stack_indices", "euler_deg", "shifts_angstrom", "defocus_u_angstrom",
    "defocus_v_angstrom", "defocus_angle_deg", "phase_shift_deg", "ctf_bfactor", "voltage_kv",
    "cs_mm", "amplitude_contrast", "pixel_size_angstrom", "box_size", "optics_group",
]


def test_round_trip_31_is_exact(tmp_path):
    table = _random_table(tmp_path)
    star = tmp_path / "out.star"
    write_particles(star, table)
    back = read_particles(star, require_ctf=True)
    assert len(back) == len(table) and back.has_ctf
    for field in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(back, field), getattr(table, field), err_msg=field)
    assert back.star_path == str(star)
    # Stacks inside the STAR's folder are written relative, others absolute.
    text = star.read_text()
    assert "@Extract/stack.mrcs " in text
    assert f"@{tmp_path.parent}/{tmp_path.name}_elsewhere/other.mrcs " in text
    assert "_rlnImageDimensionality" in text and "opticsGroup2" in text
    assert os.listdir(tmp_path) == ["out.star"]  # no temporary file left


def test_round_trip_without_ctf_or_box(tmp_path):
    table = make_table(stack_paths=tmp_path / "s.mrcs", stack_indices=[0, 1], pixel_size_angstrom=2.0)
    assert not table.has_ctf
    write_particles(tmp_path / "p.star", table)
    back = read_particles(tmp_path / "p.star")
    assert not back.has_ctf
    np.testing.assert_array_equal(back.box_size, [-1, -1])
    np.testing.assert_array_equal(back.image_names, ["1@s.mrcs", "2@s.mrcs"])
    with pytest.raises(InputError, match="p.star: missing CTF column"):
        read_particles(tmp_path / "p.star", require_ctf=True)


def test_relion_30_file(tmp_path):
    star = _write(tmp_path, STAR_30)
    t = read_particles(star, require_ctf=True)
    pixel = 5.0 * 1e4 / 50000  # 1.0 Å
    np.testing.assert_allclose(t.pixel_size_angstrom, [pixel, pixel])
    np.testing.assert_allclose(t.shifts_angstrom, [[2.0, -1.0], [-3.0, 0.5]])
    np.testing.assert_array_equal(t.euler_deg, [[10, 20, 30], [11, 21, 31]])
    np.testing.assert_array_equal(t.defocus_u_angstrom, [15000, 16000])
    np.testing.assert_array_equal(t.defocus_angle_deg, [45, 10])
    np.testing.assert_array_equal(t.voltage_kv, [300, 300])
    np.testing.assert_array_equal(t.phase_shift_deg, [0, 0])
    np.testing.assert_array_equal(t.stack_indices, [0, 1])
    np.testing.assert_array_equal(t.box_size, [-1, -1])
    np.testing.assert_array_equal(t.optics_group, [1, 1])
    assert t.stack_paths[0] == str(tmp_path / "stack.mrcs")


def test_relion_30_shifts_in_pixels_are_scaled(tmp_path):
    star = _write(tmp_path, STAR_30.replace("50000 5.0", "25000 5.0"))  # 2 Å/px
    t = read_particles(star)
    np.testing.assert_allclose(t.shifts_angstrom, [[4.0, -2.0], [-6.0, 1.0]])


def test_relion_31_two_optics_groups(tmp_path):
    t = read_particles(_write(tmp_path, STAR_31), require_ctf=True)
    np.testing.assert_array_equal(t.optics_group, [1, 2, 1])
    np.testing.assert_array_equal(t.pixel_size_angstrom, [1.0, 1.5, 1.0])
    np.testing.assert_array_equal(t.voltage_kv, [300, 200, 300])
    np.testing.assert_array_equal(t.cs_mm, [2.7, 2.0, 2.7])
    np.testing.assert_array_equal(t.amplitude_contrast, [0.1, 0.07, 0.1])
    np.testing.assert_array_equal(t.box_size, [64, 64, 64])
    np.testing.assert_array_equal(t.shifts_angstrom, [[1.5, -2.5], [0.0, 3.0], [-1.0, 1.0]])
    np.testing.assert_array_equal(t.phase_shift_deg, [0, 10, 0])
    np.testing.assert_array_equal(t.ctf_bfactor, [0, 50, 0])
    np.testing.assert_array_equal(t.stack_indices, [0, 1, 6])
    np.testing.assert_array_equal(t.image_names[2], "000007@Particles/b.mrcs")
    assert t.stack_paths[2] == str(tmp_path / "Particles" / "b.mrcs")


@pytest.mark.parametrize("block", ["data_images", "data_", "data_particles"])
def test_block_names_and_single_row(tmp_path, block):
    text = f"{block}\nloop_\n_rlnImageName\n_rlnImagePixelSize\n_rlnAngleRot\n_rlnAngleTilt\n_rlnAnglePsi\n" \
           "3@s.mrcs 1.25 1 2 3\n"
    t = read_particles(_write(tmp_path, text))
    assert len(t) == 1
    np.testing.assert_array_equal(t.pixel_size_angstrom, [1.25])
    np.testing.assert_array_equal(t.euler_deg, [[1, 2, 3]])
    np.testing.assert_array_equal(t.stack_indices, [2])


def test_missing_poses_allowed_gives_zeros(tmp_path):
    text = "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@s.mrcs 2\n2@s.mrcs 2\n"
    t = read_particles(_write(tmp_path, text), require_poses=False)
    np.testing.assert_array_equal(t.euler_deg, np.zeros((2, 3)))
    np.testing.assert_array_equal(t.shifts_angstrom, np.zeros((2, 2)))
    assert not t.has_ctf and not t.notes  # no defocus: no CTF


def test_stack_path_resolution(tmp_path, monkeypatch):
    (tmp_path / "job" / "Particles").mkdir(parents=True)
    (tmp_path / "Extract").mkdir()
    (tmp_path / "job" / "Particles" / "beside.mrcs").touch()
    (tmp_path / "Extract" / "project.mrcs").touch()
    text = (
        "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n"
        "1@Particles/beside.mrcs 1\n1@Extract/project.mrcs 1\n1@nowhere.mrcs 1\n"
        f"1@{tmp_path}/Extract/project.mrcs 1\n"
    )
    star = _write(tmp_path / "job", text)
    monkeypatch.chdir(tmp_path)  # RELION's project directory
    t = read_particles(star, require_poses=False)
    assert list(t.stack_paths) == [
        str(tmp_path / "job" / "Particles" / "beside.mrcs"),
        str(tmp_path / "Extract" / "project.mrcs"),
        str(tmp_path / "job" / "nowhere.mrcs"),  # neither exists: STAR-relative
        str(tmp_path / "Extract" / "project.mrcs"),
    ]


def test_subset_keeps_source_rows(tmp_path):
    t = read_particles(_write(tmp_path, STAR_31))
    s = t.subset([2, 0])
    assert isinstance(s, ParticleTable) and len(s) == 2
    np.testing.assert_array_equal(s.source_rows, [2, 0])
    np.testing.assert_array_equal(s.pixel_size_angstrom, [1.0, 1.0])
    np.testing.assert_array_equal(t.subset(t.optics_group == 2).voltage_kv, [200])
    with pytest.raises(ValueError):
        t.euler_deg[0, 0] = 1.0  # read-only


def test_make_table_broadcasts_and_checks_shapes(tmp_path):
    t = make_table(stack_paths=str(tmp_path / "a.mrcs"), stack_indices=np.arange(3),
                   pixel_size_angstrom=1.5, defocus_u_angstrom=12000.0)
    np.testing.assert_array_equal(t.defocus_v_angstrom, [12000.0] * 3)
    np.testing.assert_array_equal(t.voltage_kv, [300.0] * 3)
    assert t.has_ctf and t.image_names[2] == f"3@{tmp_path}/a.mrcs"
    with pytest.raises(InputError, match="euler_deg"):
        make_table(stack_paths="a.mrcs", stack_indices=[0, 1], pixel_size_angstrom=1.0, euler_deg=np.zeros((3, 3)))


def _header(columns):
    return "data_particles\nloop_\n" + "".join(f"_{c}\n" for c in columns)


POSED = ["rlnImageName", "rlnImagePixelSize", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
OPTICS_1 = "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n\n"

BAD_FILES = {
    "unparseable": ("data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@a 1 2 3\n2@a\n",
                    r"line 5 \(data_\): 4 field\(s\), but the loop has 2 columns"),
    "not_star": ("just some text\n", "no data blocks"),
    "no_particles_block": (OPTICS_1, "no particle table"),
    "empty_table": (_header(POSED), "holds no particles"),
    "no_image_name": (_header(POSED[1:]) + "1 0 0 0\n", "data_particles has no rlnImageName"),
    "no_poses": (_header(POSED[:2]) + "1@a.mrcs 1\n", "no pose column.*rlnAngleRot"),
    "no_pixel_size": (_header(["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]) + "1@a.mrcs 0 0 0\n",
                      "no pixel size"),
    "unknown_group": (OPTICS_1 + _header(POSED[:1] + POSED[2:] + ["rlnOpticsGroup"]) + "1@a.mrcs 0 0 0 1\n1@a.mrcs 0 0 0 3\n",
                      "row 2 .* rlnOpticsGroup 3, which is not in data_optics"),
    "name_zero": (_header(POSED) + "0@a.mrcs 1 0 0 0\n", r"row 1 \(rlnImageName '0@a.mrcs'\) is not of the form"),
    "name_no_at": (_header(POSED) + "1@a.mrcs 1 0 0 0\na.mrcs 1 0 0 0\n", "row 2 .*'a.mrcs'"),
    "name_letters": (_header(POSED) + "x@a.mrcs 1 0 0 0\n", "x@a.mrcs"),
    "text_number": (_header(POSED) + "1@a.mrcs 1 0 abc 0\n", "row 1, rlnAngleTilt = 'abc' is not a finite number"),
    "nan": (_header(POSED) + "1@a.mrcs 1 0 0 0\n2@a.mrcs 1 0 0 nan\n", "row 2, rlnAnglePsi is NaN or missing"),
    "inf": (_header(POSED) + "1@a.mrcs inf 0 0 0\n", "rlnImagePixelSize .* not a finite"),
    "short_row": (_header(POSED) + "1@a.mrcs 1 0 0 0\n2@a.mrcs 1 0\n",
                  r"line 9 \(data_particles\): 3 field\(s\), but the loop has 5 columns"),
    "long_row_in_optics": ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0 7\n\n" + _header(POSED)
                           + "1@a.mrcs 1 0 0 0\n", r"line 5 \(data_optics\): 3 field\(s\), but the loop has 2"),
    "zero_pixel": (_header(POSED) + "1@a.mrcs 0 0 0 0\n", "pixel size 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_input_error_naming_the_file(tmp_path, case):
    text, message = BAD_FILES[case]
    star = _write(tmp_path, text, name=f"{case}.star")
    with pytest.raises(InputError, match=f"{case}.star: .*({message})"):
        read_particles(star)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(InputError, match="nothere.star: file not found"):
        read_particles(tmp_path / "nothere.star")
    (tmp_path / "bin.star").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="bin.star: "):
        read_particles(tmp_path / "bin.star")


def test_missing_ctf_columns_named(tmp_path):
    star = _write(tmp_path, _header(POSED + ["rlnDefocusU"]) + "1@a.mrcs 1 0 0 0 100\n", name="noctf.star")
    with pytest.raises(InputError, match="noctf.star: missing CTF column.*rlnDefocusV.*rlnVoltage"):
        read_particles(star, require_ctf=True)
    # A defocus without the voltage: no silent CTF-less reading, the column is named.
    with pytest.raises(InputError, match="noctf.star: data_particles has no rlnVoltage column"):
        read_particles(star)


OPTICS_CTF = ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n{cols}"
              "1 1.5 16 {vals}\n\n")


def _ctf_star(tmp_path, optics, particles, extra_particle_cols=(), extra_values=""):
    """A RELION 3.1 STAR with optics columns ``optics`` ({name: value}) and CTF columns ``particles``."""
    text = OPTICS_CTF.format(cols="".join(f"_{c}\n" for c in optics), vals=" ".join(str(v) for v in optics.values()))
    cols = POSED[:1] + POSED[2:] + list(particles) + list(extra_particle_cols)
    rows = [f"{i + 1}@a.mrcs 10 20 30 " + " ".join(str(v[i]) for v in particles.values()) + extra_values
            for i in range(2)]
    return _write(tmp_path, text + _header(cols) + "\n".join(rows) + "\n", name="ctf.star")


def test_missing_ctf_columns_take_relions_defaults(tmp_path):
    """rlnDefocusV = rlnDefocusU, rlnDefocusAngle 0, rlnAmplitudeContrast 0 (RELION's CTF::readByGroup
    defaults), each said in the table's notes; rlnVoltage / rlnSphericalAberration have none."""
    star = _ctf_star(tmp_path, {"rlnVoltage": 300, "rlnSphericalAberration": 2.7},
                     {"rlnDefocusU": [12000, 15000]})
    t = read_particles(star)
    assert t.has_ctf
    np.testing.assert_array_equal(t.defocus_v_angstrom, [12000, 15000])
    np.testing.assert_array_equal(t.defocus_angle_deg, [0, 0])
    np.testing.assert_array_equal(t.amplitude_contrast, [0, 0])
    np.testing.assert_array_equal(t.voltage_kv, [300, 300])
    assert len(t.notes) == 1 and "RELION's default" in t.notes[0]
    for column in ("rlnDefocusV", "rlnDefocusAngle", "rlnAmplitudeContrast"):
        assert column in t.notes[0]
    assert t.subset([1]).notes == t.notes

    full = _ctf_star(tmp_path, {"rlnVoltage": 300, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1},
                     {"rlnDefocusU": [12000, 15000], "rlnDefocusV": [11000, 14000], "rlnDefocusAngle": [5, 6]})
    t = read_particles(full)
    assert not t.notes and t.amplitude_contrast[0] == 0.1 and t.defocus_v_angstrom[1] == 14000

    for missing in ("rlnVoltage", "rlnSphericalAberration"):
        optics = {"rlnVoltage": 300, "rlnSphericalAberration": 2.7}
        del optics[missing]
        star = _ctf_star(tmp_path, optics, {"rlnDefocusU": [12000, 15000]})
        with pytest.raises(InputError, match=f"ctf.star: .* has no {missing} column, needed for the CTF"):
            read_particles(star)
    star = _ctf_star(tmp_path, {"rlnVoltage": 300, "rlnSphericalAberration": 2.7}, {"rlnDefocusV": [1e4, 2e4]})
    with pytest.raises(InputError, match="ctf.star: data_particles has rlnDefocusV but no rlnDefocusU"):
        read_particles(star)
    # Voltage and Cs without any defocus: no CTF, and nothing to say.
    star = _ctf_star(tmp_path, {"rlnVoltage": 300, "rlnSphericalAberration": 2.7}, {})
    t = read_particles(star)
    assert not t.has_ctf and not t.notes


def test_premultiplied_refused_and_unmodelled_optics_noted(tmp_path):
    base = {"rlnVoltage": 300, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
    ctf = {"rlnDefocusU": [12000, 15000], "rlnDefocusV": [12000, 15000], "rlnDefocusAngle": [0, 0]}
    star = _ctf_star(tmp_path, {**base, "rlnCtfDataAreCtfPremultiplied": 1}, ctf)
    with pytest.raises(InputError, match="ctf.star: rlnCtfDataAreCtfPremultiplied = 1: the images were multiplied"):
        read_particles(star)
    assert read_particles(star, require_images=False).has_ctf  # poses and CTF only: the images do not matter
    assert not read_particles(_ctf_star(tmp_path, {**base, "rlnCtfDataAreCtfPremultiplied": 0}, ctf)).notes

    star = _ctf_star(tmp_path, {**base, "rlnBeamTiltX": 0.3, "rlnBeamTiltY": 0.0, "rlnMagMat00": 1.01,
                                "rlnMagMat01": 0, "rlnMagMat10": 0, "rlnMagMat11": 1},
                     ctf, ["rlnOddZernike"], " [0.1,0.2]")
    notes = read_particles(star).notes
    assert len(notes) == 1 and "ignored" in notes[0]
    for column in ("rlnBeamTiltX", "rlnMagMat00", "rlnOddZernike"):
        assert column in notes[0]
    assert "rlnMagMat11" not in notes[0] and "rlnBeamTiltY" not in notes[0]  # neutral values: nothing ignored
    neutral = _ctf_star(tmp_path, {**base, "rlnBeamTiltX": 0.0, "rlnBeamTiltY": 0.0}, ctf)
    assert not read_particles(neutral).notes


def test_pose_only_star(tmp_path):
    """No rlnImageName (relion_project --ang's input): readable where images are not read."""
    star = _ctf_star(tmp_path, {"rlnVoltage": 300, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1},
                     {"rlnDefocusU": [12000, 15000]})
    text = star.read_text().replace("_rlnImageName\n", "").replace("1@a.mrcs ", "").replace("2@a.mrcs ", "")
    poses = _write(tmp_path, text, name="poses.star")
    with pytest.raises(InputError, match="poses.star: data_particles has no rlnImageName"):
        read_particles(poses)
    t = read_particles(poses, require_images=False)
    assert len(t) == 2 and t.has_ctf and list(t.stack_indices) == [-1, -1]
    np.testing.assert_array_equal(t.euler_deg, [[10, 20, 30]] * 2)
    np.testing.assert_array_equal(t.defocus_u_angstrom, [12000, 15000])


def test_write_into_missing_folder_leaves_nothing(tmp_path):
    table = _random_table(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        write_particles(tmp_path / "missing" / "p.star", table)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_temp_file_and_keeps_old(tmp_path):
    target = tmp_path / "p.star"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["p.star"] and target.read_text() == "old"

    conflicting = make_table(stack_paths=tmp_path / "s.mrcs", stack_indices=[0, 1],
                             pixel_size_angstrom=[1.0, 2.0])  # same optics group
    with pytest.raises(InputError, match="p.star: optics group 1 has several pixel_size_angstrom"):
        write_particles(target, conflicting)
    assert os.listdir(tmp_path) == ["p.star"] and target.read_text() == "old"


def test_ctf_values_that_would_give_nan_are_refused(tmp_path):
    ctf = {"rlnDefocusU": [12000, 15000]}
    for optics, message in (({"rlnVoltage": -300, "rlnSphericalAberration": 2.7}, r"rlnVoltage = -300 .* must be > 0"),
                            ({"rlnVoltage": 300, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 1.5},
                             r"rlnAmplitudeContrast = 1.5 \(optics group 1, particle row 1\) must be between 0 and 1")):
        with pytest.raises(InputError, match=f"ctf.star: {message}"):
            read_particles(_ctf_star(tmp_path, optics, ctf))


def test_pose_only_reading_names_what_it_looked_for(tmp_path):
    star = _write(tmp_path, OPTICS_1, name="optics_only.star")
    with pytest.raises(InputError, match=r"optics_only.star: no particle table \(a block with rlnImageName or rlnAngle"):
        read_particles(star, require_images=False)
