"""Every Redis key and channel llmworker uses, and how long each lives.

All keys of a deployment start with ``{<REDIS_PREFIX>}:``. The braces make the prefix a
hash tag, so every key lands in one Cluster slot and the Lua scripts, which touch many
keys, also run on a Redis Cluster or a managed Redis. Two deployments sharing a Redis
use two prefixes.

The Lua scripts (``lua/*.lua``) build the same names from the same prefix; the table
below is the reference for both sides:

=====================================  =======  ==========================================
key                                    type     lifetime
=====================================  =======  ==========================================
``task:<id>``                          hash     none while queued or running (durable);
                                                ``RESULT_TTL_S`` after a final state
``ik:<tenant>/<key>``                  string   as its task: the id of the tenant's task
                                                admitted with that idempotency key
``ev:<id>``                            stream   once somebody followed the task (a task
                                                nobody follows has none) until
                                                EVENTS_KEPT_S after it ended (its record
                                                stays longer); ~EVENTS_MAXLEN entries
``fl:<id>``                            set      FOLLOW_TTL_S, renewed while readers stay:
                                                the replicas whose readers follow the task
``seq``                                string   forever: the admission order counter
``wrr``                                string   forever: the weighted tier schedule position
``lanes:<tier>``                       set      routes (``<model>|<kind>``) of the tier with
                                                waiting tasks
``lane:<tier>:<route>``                zset     users with waiting tasks, scored by the
                                                sequence number of their oldest one
``uq:<tier>:<route>:<user>``           list     one user's waiting tasks, oldest first
``depth``                              hash     waiting tasks per ``<tier>`` and ``<tier>|<model>``
``running``                            zset     running task ids scored by lease expiry (ms)
``g:m:<tier>:<model>``                 zset     guardModel: run tokens scored by lease expiry
``g:t:<model>``                        zset     the model's cap over all tiers (if set)
``g:u:<user>``                         zset     guardUser
``replicas``                           zset     replica ids scored by heartbeat expiry (ms)
``idle``                               zset     replicas waiting for a wake, scored by when
                                                they claim again anyway (ms); lapsed
                                                entries are pruned by the reaper
``jti:<id>``                            string   a QStash signature already used, until it
                                                expires (replays are refused)
``clock``                              string   forever: when a claim, renewal or reap last
                                                reached Redis (ms); a gap opens a pause
``pause``                              string   ``<from> <until> <opened>`` while leases that
                                                lapsed in a gap nobody could reach Redis in
                                                are held (lua/_common.lua, lapse_cutoff)
``callbacks``                          zset     the callback outbox: ids of finished tasks
                                                with a callback_url, scored by when the
                                                next attempt is due (ms); left once
                                                delivered, failed or the record expired
``tp:<minute>``                        hash     two hours: tasks that reached each final
                                                state in that minute (the dashboard's chart)
``failures``                           zset     ids of the latest tasks that failed or were
                                                cancelled (at most 500), scored by when;
                                                left once their record expires
``ms:<model>``                         hash     forever (a few fields per model): what the
                                                model's provider said lately: a hold until
                                                a time, its circuit, its adaptive cap, its
                                                usual output (lua/_common.lua, model_state)
``rpm:<model>[:<tier>]``               zset     RPM_* window: run tokens by claim time (ms),
                                                pruned past the window by every claim
``tpm:<model>[:<tier>]``               zset     TPM_* window: run tokens by claim time, with
``tpmv:<model>[:<tier>]``              hash     each entry's tokens and their ``_sum``
``sp:<tier>``                          set      routes whose waiting tasks have other models
                                                (spill-over and fallbacks look there)
``ph:<minute>``                        hash     two hours: provider calls in that minute,
                                                by model and outcome, duration and time to
                                                first token buckets (observe/health.py)
``ledger``                             stream   LEDGER_RETENTION_DAYS: one entry per finished
                                                attempt: who, what, tokens, cost (ledger.py)
``ld:d<day>`` / ``lt:d<day>``          hash     LEDGER_RETENTION_DAYS past the day: the day's
                                                totals per tier, model and user / per tier
                                                and model (day of QUOTA_TIMEZONE)
``q:<user>:m<month>``                  hash     two days past the month: the user's windows,
                                                field ``m<month>`` and ``d<day>`` for each
                                                of its days: tasks, tokens, nano-USD used
                                                and reserved (lua/_common.lua, add_windows)
``qu:<user>``                          hash     forever: the user's own quota limits, and
                                                prepaid credits and what running tasks
                                                reserved of them (quotas.py)
``crref:<user>:<reference>``           string   90 days: a credit top-up already applied
``qp``                                 zset     tasks cancelled while running whose run is
                                                still to be booked, by lease expiry (ms)
=====================================  =======  ==========================================

Channels: ``wake`` (a task was queued or a slot freed: idle dispatchers try a claim),
``cancel`` (a task id whose run must stop), ``follow`` (a task id somebody started
following: its run streams its text from then on) and ``hub:<replica>`` (a task id
with new events, for the replica's readers; hub.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# A stream per task holds its status, progress and token events; past this many entries
# the oldest are trimmed (approximately, which is cheap) so a long stream stays bounded.
EVENTS_MAXLEN = 2000
# A finished task's events stay this long (or RESULT_TTL_S if shorter), for a reader
# resuming a stream cut near its end; a reader who comes later gets the record, which
# holds the whole answer.
EVENTS_KEPT_S = 600

# A replica's hub stays named as a task's follower this long without renewing (it
# renews every SSE ping while its readers stay): a hub that died stops costing the
# task's writer a publish per event within this time.
FOLLOW_TTL_S = 60

# How long a finished task's record, its idempotency key and its events stay readable
# is RESULT_TTL_S (settings). Queued and running tasks never expire: nothing is lost.


@dataclass(frozen=True)
class Keys:
    """Key names for one deployment prefix."""

    prefix: str

    @property
    def base(self) -> str:
        """What every key starts with; passed to the Lua scripts as KEYS[1]."""
        return "{" + self.prefix + "}:"

    def task(self, task_id: str) -> str:
        return f"{self.base}task:{task_id}"

    def idem(self, ref: str) -> str:
        """``ref``: a tenant's idempotency key as stored (``<tenant>/<key>``, auth.py)."""
        return f"{self.base}ik:{ref}"

    def events(self, task_id: str) -> str:
        return f"{self.base}ev:{task_id}"

    def followers(self, task_id: str) -> str:
        return f"{self.base}fl:{task_id}"

    def hub_channel(self, hub: str) -> str:
        return f"{self.base}hub:{hub}"

    @property
    def follow_channel(self) -> str:
        return f"{self.base}follow"

    @property
    def depth(self) -> str:
        return f"{self.base}depth"

    @property
    def running(self) -> str:
        return f"{self.base}running"

    def signature_seen(self, jti: str) -> str:
        return f"{self.base}jti:{jti}"

    @property
    def callbacks(self) -> str:
        return f"{self.base}callbacks"

    @property
    def replicas(self) -> str:
        return f"{self.base}replicas"

    @property
    def idle(self) -> str:
        return f"{self.base}idle"

    def guard_model(self, model: str, tier: str) -> str:
        return f"{self.base}g:m:{tier}:{model}"

    def guard_model_total(self, model: str) -> str:
        return f"{self.base}g:t:{model}"

    def model_state(self, model: str) -> str:
        return f"{self.base}ms:{model}"

    def requests_window(self, model: str, tier: str = "") -> str:
        return f"{self.base}rpm:{model}" + (f":{tier}" if tier else "")

    def tokens_window(self, model: str, tier: str = "") -> str:
        return f"{self.base}tpm:{model}" + (f":{tier}" if tier else "")

    def tokens_values(self, model: str, tier: str = "") -> str:
        return f"{self.base}tpmv:{model}" + (f":{tier}" if tier else "")

    def guard_user(self, user: str) -> str:
        return f"{self.base}g:u:{user}"

    @property
    def wake_channel(self) -> str:
        return f"{self.base}wake"

    @property
    def cancel_channel(self) -> str:
        return f"{self.base}cancel"

    @property
    def pattern(self) -> str:
        """Matches every key of the deployment (for tests and ``SCAN`` clean-ups)."""
        return self.base.replace("{", "\\{").replace("}", "\\}") + "*"
