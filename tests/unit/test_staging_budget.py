"""The bounds of working-set staging (sessions/staging.py): the bytes staged by all
sessions of an agent together stay within the host cache's size, a session that cannot
get them stages fewer chunks, a stopped session gives its share back, zero chunks are
never asked for, and one stage asks for at most 4096 chunks."""

from __future__ import annotations

from pagewire.peer.remote_export import RemoteExport
from pagewire.sessions.staging import MAX_CHUNKS, Budget, WorkingSetStage

CHUNK, PAGE = 64 << 10, 4096


def export(chunks: int, zero_chunks: tuple[int, ...] = ()) -> RemoteExport:
    per = CHUNK // PAGE
    zero = bytearray(chunks * per)
    for c in zero_chunks:
        zero[c * per : (c + 1) * per] = b"\1" * per
    return RemoteExport(
        name="img", size=chunks * CHUNK, page_size=PAGE, chunk_size=CHUNK,
        zero_map=bytes(zero), digests=[b"\0" * 32] * chunks, generation="g",
    )  # fmt: skip


def test_sessions_share_one_budget_and_give_it_back() -> None:
    used = Budget.used
    remote, limit = export(16), used + 3 * CHUNK
    first = WorkingSetStage(remote, [0, 1], limit, {})
    second = WorkingSetStage(remote, [2, 3], limit, {})  # one chunk's bytes are left
    assert (first.chunks, second.chunks) == ([0, 1], [2])
    first.close()
    first.close()  # once only
    third = WorkingSetStage(remote, [4, 5], limit, {})
    assert third.chunks == [4, 5]
    second.close()
    third.close()
    assert Budget.used == used


def test_zero_chunks_are_not_staged_and_a_stage_asks_for_at_most_4096() -> None:
    remote = export(MAX_CHUNKS + 8, zero_chunks=(1,))
    stage = WorkingSetStage(remote, list(range(MAX_CHUNKS + 8)), 1 << 40, {})
    try:
        assert 1 not in stage.chunks and len(stage.chunks) == MAX_CHUNKS
    finally:
        stage.close()


def test_a_closed_stage_keeps_nothing_that_lands_late() -> None:
    stage = WorkingSetStage(export(4), [0, 1], 1 << 40, {})
    stage.land({0: b"x" * CHUNK})
    stage.close()
    stage.land({1: b"y" * CHUNK})
    assert stage.kept == {} and stage.landed == {0}


def test_what_attach_left_to_staging_and_never_came_is_handed_back() -> None:
    """Before attach nothing is owed (the engine's channel asks for the whole rest); after
    it, what was on its way and never landed is, and the stage then lets its budget go."""
    early = WorkingSetStage(export(4), [0, 1], 1 << 40, {})
    assert early.fetched() == []
    early.close()
    used = Budget.used
    stage = WorkingSetStage(export(4), [0, 1, 2], 1 << 40, {})
    stage.on_the_way.update([1, 2])
    installed: list[int] = []
    stage.attach(lambda index, data: installed.append(index))
    stage.land({1: b"x" * CHUNK})
    assert installed == [1] and stage.fetched() == [2]
    assert stage.closed and Budget.used == used
