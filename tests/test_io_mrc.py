"""MRC maps and stacks: round trips, headers, and bad files."""

import os

import mrcfile
import numpy as np
import pytest

from jaxcryo.io import InputError, open_stack, read_map, write_map, write_stack


def test_map_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_map(path, volume, voxel_size_angstrom=1.7)
    back, voxel = read_map(path)
    assert back.dtype == np.float32 and voxel == 1.7
    np.testing.assert_array_equal(back, volume)
    with mrcfile.open(path) as mrc:  # strict mode: the header is valid
        assert mrc.voxel_size.x == pytest.approx(1.7) and mrc.voxel_size.z == pytest.approx(1.7)
        assert tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)
        assert (mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart) == (0, 0, 0)
        assert mrc.header.mode == 2 and not mrc.is_image_stack()
        assert mrc.header.dmax == pytest.approx(volume.max())
    assert os.listdir(tmp_path) == ["map.mrc"]


def test_map_written_as_float64_is_stored_float32(tmp_path):
    write_map(tmp_path / "m.mrc", np.ones((4, 4, 4)), voxel_size_angstrom=2.0)
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        assert mrc.data.dtype == np.float32


def test_map_voxel_size_zero_is_returned(tmp_path):
    with mrcfile.new(tmp_path / "z.mrc") as mrc:
        mrc.set_data(np.ones((4, 4, 4), np.float32))
    assert read_map(tmp_path / "z.mrc")[1] == 0.0


def test_map_nonstandard_axis_order_is_permuted(tmp_path):
    data = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    with mrcfile.new(tmp_path / "axes.mrc") as mrc:
        mrc.set_data(data)
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 2, 1, 3  # columns are y, rows are x
    volume, _ = read_map(tmp_path / "axes.mrc")
    np.testing.assert_array_equal(volume, data.transpose(0, 2, 1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # writing NaN/Inf on purpose
def test_map_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="none.mrc: file not found"):
        read_map(tmp_path / "none.mrc")
    with mrcfile.new(tmp_path / "box.mrc") as mrc:
        mrc.set_data(np.zeros((4, 6, 6), np.float32))
    with pytest.raises(InputError, match=r"box.mrc: expected a cubic 3-D map, found shape \(4, 6, 6\)"):
        read_map(tmp_path / "box.mrc")
    bad = np.zeros((4, 4, 4), np.float32)
    bad[1, 2, 3] = np.nan
    write_map(tmp_path / "nan.mrc", bad, voxel_size_angstrom=1.0)
    with pytest.raises(InputError, match="nan.mrc: map contains NaN or Inf"):
        read_map(tmp_path / "nan.mrc")
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file" * 3)
    with pytest.raises(InputError, match="junk.mrc: unreadable"):
        read_map(tmp_path / "junk.mrc")


def test_write_into_missing_folder_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        write_map(tmp_path / "no" / "m.mrc", np.zeros((4, 4, 4)), voxel_size_angstrom=1.0)
    with pytest.raises(InputError, match="m.mrcs: write_stack needs"):
        write_stack(tmp_path / "m.mrcs", np.zeros((4, 4)), pixel_size_angstrom=1.0)
    assert os.listdir(tmp_path) == []


def test_stack_round_trip_memmap(tmp_path):
    images = np.random.default_rng(1).normal(size=(5, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", images, pixel_size_angstrom=1.31)
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        assert mrc.is_image_stack() and mrc.header.ispg == 0
        assert mrc.voxel_size.x == pytest.approx(1.31)
    with open_stack(tmp_path / "s.mrcs") as stack:
        assert isinstance(stack.data, np.memmap)
        assert len(stack) == 5 and stack.box_size == 8 and stack.pixel_size_angstrom == 1.31
        np.testing.assert_array_equal(stack.data[[4, 1]], images[[4, 1]])
    assert stack.data is None  # closed
    assert os.listdir(tmp_path) == ["s.mrcs"]


def test_single_image_file_is_a_stack_of_one(tmp_path):
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(np.full((6, 6), 3.0, np.float32))
    with open_stack(tmp_path / "one.mrc") as stack:
        assert stack.data.shape == (1, 6, 6) and stack.data[0, 0, 0] == 3.0


def test_stack_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="gone.mrcs: file not found"):
        open_stack(tmp_path / "gone.mrcs")
    write_stack(tmp_path / "rect.mrcs", np.zeros((3, 6, 8)), pixel_size_angstrom=1.0)
    with pytest.raises(InputError, match=r"rect.mrcs: expected square images, found stack shape \(3, 6, 8\)"):
        open_stack(tmp_path / "rect.mrcs")
    write_stack(tmp_path / "cut.mrcs", np.zeros((3, 8, 8)), pixel_size_angstrom=1.0)
    with open(tmp_path / "cut.mrcs", "r+b") as f:
        f.truncate(1024 + 8 * 8 * 4)  # header + 1 of 3 images
    with pytest.raises(InputError, match="cut.mrcs: unreadable"):
        open_stack(tmp_path / "cut.mrcs")
