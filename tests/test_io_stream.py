"""Streaming particle images: gathering across stacks, validation, prefetching."""

import threading

import numpy as np
import pytest

from jaxcryo.io import (
    InputError,
    ParticleStack,
    estimate_memory_bytes,
    make_table,
    read_particles,
    write_particles,
    write_stack,
)


def _dataset(tmp_path, *, sizes=(5, 4), box=8, header_pixel=1.5, star_pixel=1.5, box_in_star=None):
    """Stacks of distinct images (image value = 100*stack + index), and a STAR file that reads them all."""
    paths, indices, expected = [], [], []
    for k, n in enumerate(sizes):
        images = (100 * k + np.arange(n, dtype=np.float32))[:, None, None] * np.ones((box, box), np.float32)
        path = tmp_path / f"stack{k}.mrcs"
        write_stack(path, images, pixel_size_angstrom=header_pixel)
        paths += [str(path)] * n
        indices += list(range(n))
        expected.append(images)
    # Interleave stacks so gathering has to switch files.
    order = np.argsort(np.array(indices) * 10 + np.repeat(np.arange(len(sizes)), sizes), kind="stable")
    table = make_table(stack_paths=np.array(paths)[order], stack_indices=np.array(indices)[order],
                       pixel_size_angstrom=star_pixel, box_size=-1 if box_in_star is None else box_in_star)
    star = tmp_path / "particles.star"
    write_particles(star, table)
    return read_particles(star, require_poses=False), np.concatenate(expected)[order]


def test_read_gathers_across_stacks_in_order(tmp_path):
    table, expected = _dataset(tmp_path)
    with ParticleStack(table) as stack:
        stack.validate()
        assert stack.box_size == 8 and len(stack) == 9
        assert stack.nbytes_per_image == 8 * 8 * 4
        rows = [8, 0, 3, 3, 5]
        images = stack.read(rows)
        assert images.dtype == np.float32 and images.shape == (5, 8, 8)
        np.testing.assert_array_equal(images, expected[rows])
        assert stack.read([]).shape == (0, 8, 8)


def test_few_open_files_still_reads_everything(tmp_path):
    table, expected = _dataset(tmp_path, sizes=(2, 3, 2, 1))
    with ParticleStack(table, max_open=1) as stack:
        np.testing.assert_array_equal(stack.read(np.arange(len(table))[::-1]), expected[::-1])
        assert len(stack._open) == 1


def test_index_past_end(tmp_path):
    _, _ = _dataset(tmp_path, sizes=(3,))
    text = (tmp_path / "particles.star").read_text().replace("3@stack0.mrcs", "18@stack0.mrcs")
    (tmp_path / "particles.star").write_text(text)
    table = read_particles(tmp_path / "particles.star", require_poses=False)
    stack = ParticleStack(table)
    with pytest.raises(InputError, match=r"particles.star: row 3 \(rlnImageName '18@stack0.mrcs'\) points past "
                                         r"the end of .*stack0.mrcs, which holds 3 images"):
        stack.validate()
    with pytest.raises(InputError, match="row 3 .* points past the end"):
        stack.read([0, 2])
    np.testing.assert_array_equal(stack.read([1])[0, 0, 0], 1.0)
    stack.close()


def test_missing_stack_named_with_its_star_row(tmp_path):
    table, _ = _dataset(tmp_path, sizes=(2,))
    (tmp_path / "stack0.mrcs").unlink()
    with pytest.raises(InputError, match=r"particles.star: row 1 \(rlnImageName '1@stack0.mrcs'\): .*stack0.mrcs: file not found"):
        ParticleStack(table)


def test_box_mismatch_between_stacks(tmp_path):
    table, _ = _dataset(tmp_path, sizes=(2, 2))
    write_stack(tmp_path / "stack1.mrcs", np.zeros((2, 10, 10)), pixel_size_angstrom=1.5)
    with ParticleStack(table) as stack, pytest.raises(InputError, match="stacks have different image sizes.* 8 px.* 10 px"):
        stack.validate()


def test_box_mismatch_with_star(tmp_path):
    table, _ = _dataset(tmp_path, box_in_star=12)
    with ParticleStack(table) as stack, pytest.raises(
        InputError, match=r"particles.star: rlnImageSize is 12 px but .*stack\d.mrcs holds 8 px images"
    ):
        stack.validate()
    table, _ = _dataset(tmp_path, box_in_star=8)
    with ParticleStack(table) as stack:
        stack.validate()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # writing NaN/Inf on purpose
def test_nan_image_detected(tmp_path):
    images = np.zeros((4, 8, 8), np.float32)
    images[2, 3, 3] = np.inf
    write_stack(tmp_path / "bad.mrcs", images, pixel_size_angstrom=1.0)
    table = make_table(stack_paths=tmp_path / "bad.mrcs", stack_indices=np.arange(4), pixel_size_angstrom=1.0)
    with ParticleStack(table) as stack:
        stack.read([0, 1, 3])
        with pytest.raises(InputError, match=r"bad.mrcs: image 3 \(used by particle table: row 3 .*\) contains NaN or Inf"):
            stack.read([1, 2])


def test_pixel_size_note(tmp_path):
    table, _ = _dataset(tmp_path, header_pixel=0.0, star_pixel=1.31)
    with ParticleStack(table) as stack:
        assert stack.header_pixel_size == 0.0
        assert stack.pixel_size_note() == "stack0.mrcs header says 0.00 Å/px; using the STAR's 1.31 Å/px"
    table, _ = _dataset(tmp_path, header_pixel=1.3, star_pixel=1.31)  # within 1%
    with ParticleStack(table) as stack:
        assert stack.pixel_size_note() is None


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_iter_chunks_visits_each_row_once_in_order(tmp_path, prefetch):
    table, expected = _dataset(tmp_path)
    order = np.random.default_rng(2).permutation(len(table))
    with ParticleStack(table) as stack:
        chunks = list(stack.iter_chunks(4, order=order, prefetch=prefetch))
    assert [len(c) for c, _ in chunks] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([c for c, _ in chunks]), order)
    for rows, images in chunks:
        np.testing.assert_array_equal(images, expected[rows])


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "jaxcryo-prefetch"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # writing NaN/Inf on purpose
def test_iter_chunks_reader_error_propagates_and_thread_stops(tmp_path):
    images = np.zeros((6, 8, 8), np.float32)
    images[5, 0, 0] = np.nan
    write_stack(tmp_path / "s.mrcs", images, pixel_size_angstrom=1.0)
    table = make_table(stack_paths=tmp_path / "s.mrcs", stack_indices=np.arange(6), pixel_size_angstrom=1.0)
    seen = []
    with ParticleStack(table) as stack:
        with pytest.raises(InputError, match=r"s.mrcs: image 6 .* NaN"):
            for rows, _ in stack.iter_chunks(2, prefetch=2):
                seen.extend(rows)
    assert seen == [0, 1, 2, 3]
    assert not _prefetch_threads()


def test_iter_chunks_early_stop_and_consumer_error_stop_thread(tmp_path):
    table, _ = _dataset(tmp_path, sizes=(20,))
    with ParticleStack(table) as stack:
        for rows, _ in stack.iter_chunks(1, prefetch=2):
            break
        chunks = stack.iter_chunks(1, prefetch=2)
        next(chunks)
        chunks.close()
        with pytest.raises(ZeroDivisionError):
            for rows, _ in stack.iter_chunks(1, prefetch=2):
                1 / 0
    assert not _prefetch_threads()


def test_estimate_memory_bytes():
    assert estimate_memory_bytes(10, 128) == 10 * 128 * 128 * 4
    assert estimate_memory_bytes(3, 64, dtype_bytes=8) == 3 * 64 * 64 * 8
