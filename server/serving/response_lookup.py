"""Finding a stored response and its saved state wherever they were written.

A stored response is a record (`ResponseStore`: the object GET returns and what continuing it
needs) and a saved state (the engine core's `StateStore`). With a `--state-store-dir` both are
files there, the state written when the engine saves it and the record when the response
ends, both before the client has the whole response. Whoever reads the directory can continue
the conversation: another front end of this server, this server after a restart, another
replica that mounts the same directory. This front end's view of its core's store
(`AsyncEngine.saved_states`) knows only what its own core saved or found, so a state that
is not in it is looked up in the directory; the core reads the file itself when the
continuation arrives (`StateStore` looks up keys it does not know). The directory is the
truth: a state whose file is gone (deleted, or dropped by some replica's budget) is gone,
unless this core holds it in host memory only, being too large for the disk budget.

Without a shared directory a response lives on the replica that made it, and a continuation
that a balancer sends to another replica gets a 404 that says so.
"""

from __future__ import annotations

from server.http.errors import APIError
from server.serving.context import ServerContext
from server.serving.responses_store import StoredResponse
from tova_engine.state.store import SavedState, read_saved_state, snapshot_path

DOCS = "docs/reliability.md#conversations-across-replicas"


def find_stored(ctx: ServerContext, response_id: str, param: str | None) -> StoredResponse:
    """The stored response `response_id` whose state can still be continued, else 404 (`param`
    names the field that gave the id). Its state is in `ctx.engine.saved_states` on return,
    as the engine requires of a continuation."""
    ctx.responses.prune(lambda other: _alive(ctx, other))
    record = ctx.responses.get(response_id)
    if record is None:
        raise not_found(ctx, response_id, param)
    state = reach_state(ctx, record.id)
    if state is None:
        if ctx.engine.config.state_store_dir is not None:
            # Its state file, written before the record, is gone: so is the response. (Without
            # a directory this front end's view of the core's store may lag it by a step, so
            # the record is left to `prune`.)
            ctx.responses.delete(record.id)
        raise not_found(ctx, response_id, param)
    # Made by another replica (or this one before a restart): the engine's `prepare` admits
    # keys its view holds; the core finds the file by the same key.
    ctx.engine.adopt_state(state)
    return record


def reach_state(ctx: ServerContext, response_id: str) -> SavedState | None:
    """The saved state of `response_id` this server can continue, or None."""
    known = ctx.engine.saved_states.get(response_id)
    if known is not None:
        return known if _alive(ctx, response_id) else None
    directory = ctx.engine.config.state_store_dir
    return None if directory is None else read_saved_state(snapshot_path(directory, response_id))


def _alive(ctx: ServerContext, response_id: str) -> bool:
    """Whether the state of `response_id` is still to be had (without reading it)."""
    known = ctx.engine.saved_states.get(response_id)
    config = ctx.engine.config
    if config.state_store_dir is None:
        return known is not None
    if known is not None and known.nbytes > config.state_store_disk_bytes:
        return True  # never written: this core's host memory holds the only copy
    return snapshot_path(config.state_store_dir, response_id).exists()


def not_found(ctx: ServerContext, response_id: str, param: str | None) -> APIError:
    """404 for a response this server cannot find, saying where it looked and why another
    replica's responses may not be there."""
    directory = ctx.engine.config.state_store_dir
    where = ("this server keeps them in memory (no --state-store-dir)" if directory is None
             else "this server reads them from its --state-store-dir")
    message = (
        f"Response with id '{response_id}' not found (never stored, deleted or expired). "
        f"A stored response lives where the server that made it keeps it, and {where}: "
        "behind a load balancer, replicas continue each other's responses only when every "
        f"replica mounts one shared directory as --state-store-dir ({DOCS})."
    )
    return APIError(404, message, param, "not_found")
