"""The record of a distributed build in progress: what a rerun may reuse.

:func:`bitshard.build_index` keeps, under the index root, ``builds/<name>.json``
(this record: the call's settings, the source's identity, the rotation, the
task plan, the finished segments and merges) beside ``builds/<name>.ivf``
(the IVF model). Running the same call again after the driver died loads the
record and reuses its artifacts and every finished, verified segment; the
build deletes both files once it has committed. See docs/distributed.md,
*Resumable builds*.

:class:`BuildState` is the one type that loads, creates, records into, saves
and discards that record.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from . import names, schema
from .artifacts import IvfModel, Rotation, as_ivf_model
from .errors import CorruptIndexError
from .storage import Storage

__all__ = ["BuildState", "BUILD_STATE_FORMAT", "BUILD_STATE_VERSION", "state_keys"]

# Messages about a build's state are the build's: one logger for both.
log = logging.getLogger("bitshard.distributed")

BUILD_STATE_FORMAT = schema.BUILD_STATE_FORMAT
BUILD_STATE_VERSION = schema.BUILD_STATE_VERSION


def state_keys(name: str) -> Tuple[str, str]:
    """The keys of a build's state and IVF model files under the index root."""
    return names.build_state_key(name), names.build_ivf_key(name)


def _write_json_atomic(st: Storage, key: str, doc: Dict[str, Any]) -> None:
    # Locally a temp file + os.replace; on an object store one PUT (atomic).
    st.write_bytes(key, json.dumps(doc, indent=1, sort_keys=True).encode())


class BuildState:
    """The state of one build of index ``name`` under the index root ``storage``.

    ``doc`` is the JSON document as stored. A build over a source with no
    version to pin it to (an in-memory array) is not ``persistent``: its
    record lives in memory only, since no rerun could prove it reads the
    same data (its IVF model file is still written: the workers load it).
    """

    def __init__(self, storage: Storage, name: str, doc: Dict[str, Any],
                 persistent: bool = True) -> None:
        self.storage = storage
        self.name = name
        self.doc = doc
        self.persistent = persistent
        self.key, self.ivf_key = state_keys(name)

    # -------------------------------------------------------------- load

    @classmethod
    def load(cls, storage: Storage, name: str) -> Optional["BuildState"]:
        """The stored state of an unfinished build of ``name``; None if there
        is none, or it fails :func:`bitshard.schema.read_build_state` (size,
        nesting, format, every field's type and range: logged with the file
        and the field, and the build then starts afresh)."""
        key, _ = state_keys(name)
        try:
            doc = schema.read_build_state(storage.read_bytes(key), storage.path(key))
        except FileNotFoundError:
            return None
        except (OSError, CorruptIndexError) as e:
            log.warning("ignoring build state: %s", e)
            return None
        return cls(storage, name, doc)

    def mismatch(self, params: Dict[str, Any], source: Dict[str, Any]) -> Optional[str]:
        """Why this state cannot be resumed by a call with ``params`` over the
        source identified by ``source`` (kind, uri, version); None if it can."""
        if source["version"] is None:
            return "an in-memory source has no version to pin the build to"
        if self.doc.get("params") != params:
            return "the call's settings differ"
        if self.doc.get("source") != source:
            return (f"the source changed (version "
                    f"{self.doc.get('source', {}).get('version')!r} then, "
                    f"{source['version']!r} now)")
        return None

    def artifacts(self, metric: str, fragment_ids: Sequence[int]) -> Tuple[IvfModel, Rotation]:
        """The recorded IVF model (read from its file) and rotation, after
        checking the model against the recorded fingerprint and the task plan
        against the source's ``fragment_ids``.

        Raises:
            CorruptIndexError, OSError, KeyError, ValueError, TypeError: the
                record or the model file is unusable.
        """
        ivf = as_ivf_model(IvfModel.from_bytes(self.storage.read_bytes(self.ivf_key)), metric)
        rot = Rotation.from_bytes(bytes.fromhex(self.doc["rotation"]))
        if ivf.fingerprint != self.doc["ivf_fingerprint"]:
            raise CorruptIndexError("IVF model file does not match the build state")
        tasks_ok = sorted(f for t in self.doc["tasks"] for f in t["fragment_ids"]) \
            == sorted(fragment_ids)
        if not tasks_ok:
            raise CorruptIndexError("the recorded tasks do not cover the source")
        return ivf, rot

    # ------------------------------------------------------------ create

    @classmethod
    def create(cls, storage: Storage, name: str, params: Dict[str, Any],
               source: Dict[str, Any], ivf: IvfModel, rot: Rotation,
               tasks: List[List[int]], rows_of: Dict[int, int]) -> "BuildState":
        """A new state for a build that starts now: writes the IVF model file
        and, for a source with a version, the state file.

        Args:
            params: the call's settings (what makes "the same call").
            source: the source's identity (kind, uri, version).
            tasks: the encode plan, fragment-id lists (see ``plan_tasks``).
            rows_of: live rows per fragment id.
        """
        key, ivf_key = state_keys(name)
        doc = {
            "format": BUILD_STATE_FORMAT, "format_version": BUILD_STATE_VERSION,
            "name": name, "index_type": "IVF_RQ", "params": params, "source": source,
            "rotation": rot.to_bytes().hex(), "rotation_seed": rot.seed,
            "ivf_file": ivf_key.rsplit("/", 1)[-1], "ivf_fingerprint": ivf.fingerprint,
            "tasks": [{"id": i, "fragment_ids": t, "num_rows": sum(rows_of[f] for f in t)}
                      for i, t in enumerate(tasks)],
            "segments": {}, "merges": [], "created_at": time.time(),
        }
        state = cls(storage, name, doc, persistent=source["version"] is not None)
        storage.write_bytes(ivf_key, ivf.to_bytes())
        if state.persistent:
            _write_json_atomic(storage, key, doc)
        return state

    # -------------------------------------------------------------- read

    @property
    def tasks(self) -> List[Dict[str, Any]]:
        """The encode tasks: ``{"id", "fragment_ids", "num_rows"}`` each, in id order."""
        return self.doc["tasks"]

    def finished_segments(self) -> List[Tuple[int, str]]:
        """``(task id, segment uuid)`` of every task recorded as finished."""
        return [(int(k), u) for k, u in self.doc["segments"].items()]

    def recorded_merges(self) -> Dict[Tuple[str, ...], str]:
        """Merged segment uuid by the tuple of its input uuids."""
        return {tuple(m["inputs"]): m["uuid"] for m in self.doc["merges"]}

    def segment_uuids(self) -> Set[str]:
        """Every segment uuid the build recorded (encoded and merged)."""
        return set(self.doc["segments"].values()) | {m["uuid"] for m in self.doc["merges"]}

    # ------------------------------------------------------------ record

    def record_segment(self, task_id: int, uuid: str) -> None:
        """Task ``task_id`` wrote segment ``uuid``; saved at once."""
        self.doc["segments"][str(task_id)] = uuid
        self.save()

    def forget_segment(self, task_id: int) -> None:
        """Task ``task_id``'s recorded segment is unusable: run it again."""
        for key in [k for k in self.doc["segments"] if int(k) == task_id]:
            del self.doc["segments"][key]

    def record_merge(self, inputs: Sequence[str], uuid: str) -> None:
        """Segments ``inputs`` (uuids) were merged into ``uuid``; saved at once."""
        self.doc["merges"].append({"inputs": list(inputs), "uuid": uuid})
        self.save()

    def save(self) -> None:
        """Write the state file (in one atomic step); a no-op unless persistent."""
        if self.persistent:
            self.doc["updated_at"] = time.time()
            _write_json_atomic(self.storage, self.key, self.doc)

    # ----------------------------------------------------------- discard

    def discard(self) -> None:
        """Delete the state and IVF model files (the build is done), and the
        ``builds/`` directory if no other build is in progress."""
        self.storage.delete(self.key)
        self.storage.delete(self.ivf_key)
        self.storage.remove_empty_dir(names.BUILDS_DIR)
