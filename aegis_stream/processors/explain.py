"""The exact explanation of one decision.

No re-evaluation: the event names the generation and the rule index the kernel matched
(``generation``, ``rule_index``), and the generation record in the store is the
compiled table the kernel held.  The explanation reads the rule, policy and scope from
that record and checks that it agrees with the event (inode, action, scope); any
disagreement is listed in ``inconsistencies`` instead of being papered over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aegis_stream.kernel import abi
from aegis_stream.kernel.devnum import split_kernel_dev
from aegis_stream.pipeline.schema import (
    DecisionEvent,
    ExplainedPolicy,
    ExplainedRule,
    ExplainedScope,
    ExplainedTask,
    ExplanationEvent,
)

if TYPE_CHECKING:  # the normaliser pulls in numpy; explain needs only the type
    from aegis_stream.pipeline.normalise import GenerationInfo


def _actions(bits: int) -> list[str]:
    return [name for name, bit in abi.ACTION_BITS.items() if bits & bit]


def explain(event: DecisionEvent, info: GenerationInfo | None) -> ExplanationEvent:
    path: list[str] = [f"slot {event.slot} active (generation {event.generation})"]
    problems: list[str] = []
    inode = f"{event.dev}:{event.ino}"
    rec = info.record if info else None
    rule = None
    via = ""
    if rec is None:
        problems.append(f"no record of generation {event.generation} in the store")
        path.append(f"inode {inode} matched rule index {event.rule_index} "
                    f"(generation {event.generation} has no record: rule unknown)")
    elif not 0 <= event.rule_index < len(rec.policy.rules):  # a negative index is no rule either
        problems.append(f"generation {event.generation} has {len(rec.policy.rules)} rules; "
                        f"the event names index {event.rule_index}")
        path.append(f"inode {inode} matched rule index {event.rule_index} (not in the record)")
    else:
        rule = rec.policy.rules[event.rule_index]
        ma, mi = split_kernel_dev(rule.dev)
        acts = ",".join(_actions(rule.actions))
        at_rule = (f"{ma}:{mi}", rule.ino) == (event.dev, event.ino)
        carried = not at_rule and any(
            c.index == rule.index and c.ino == event.ino
            and "{}:{}".format(*split_kernel_dev(c.dev)) == event.dev for c in rec.policy.carried)
        if event.inherited:
            via = "inherited"
            path.append(f"inode {inode} matched rule {rule.id} [{acts}] inherited: the file was "
                        f"renamed over the rule's path {rule.source}, and the kernel passed the "
                        f"rule on (the generation names inode {ma}:{mi}:{rule.ino})")
        elif carried:
            via = "carried"
            path.append(f"inode {inode} matched rule {rule.id} [{acts}] carried: an earlier inode "
                        f"of its path {rule.source}, kept while it exists (restaged; the path now "
                        f"names {ma}:{mi}:{rule.ino})")
        else:
            if not at_rule:
                problems.append(f"rule {rule.id} names inode {ma}:{mi}:{rule.ino}, the event {inode}")
            path.append(f"inode {inode} matched rule {rule.id} [{acts}]")
    action_bit = abi.ACTION_BITS.get(event.action, 0)
    if rule is not None and not rule.actions & action_bit:
        problems.append(f"action {event.action} is not in rule {rule.id}'s actions")
    path.append(f"action {event.action}")

    configured = ""
    if event.scope_cgroup_id == 0:
        match = "host"
        if rec is not None and rec.policy.scopes:
            problems.append("the event says host-wide scope, the generation selects cgroups")
        path.append("scope host-wide (the generation selects no cgroups: every task)")
    else:
        match = "self" if event.scope_cgroup_id == event.cgroup_id else "ancestor"
        scope_path = event.scope_cgroup_path or f"cgroup id {event.scope_cgroup_id}"
        task_cg = event.cgroup_path or f"cgroup id {event.cgroup_id}"
        if rec is not None:
            sc = next((s for s in rec.policy.scopes if s.cgroup_id == event.scope_cgroup_id), None)
            if sc is None:
                problems.append(f"cgroup id {event.scope_cgroup_id} is not a scope of generation "
                                f"{event.generation}")
            else:
                configured = sc.cgroup
        if match == "self":
            path.append(f"scope {scope_path} matched (the task's own cgroup)")
        else:
            path.append(f"scope {scope_path} matched via ancestor of {task_cg}")

    applied = (rec.mode or rec.policy.mode) if rec is not None else ""
    if event.mode == abi.Mode.ENFORCE.label:
        outcome = "EPERM"
        path.append("mode enforce -> EPERM")
    else:
        outcome = "allowed (audit)"
        path.append("mode audit -> allowed, audited")
    if applied and applied != event.mode:
        path.append(f"(generation {event.generation} was applied in {applied} mode; "
                    f"its slot was switched to {event.mode} since, e.g. by break-glass)")

    return ExplanationEvent(
        event_id=event.event_id,
        time=event.time,
        host=event.host,
        decision=event.decision,
        outcome=outcome,
        hook=event.hook,
        action=event.action,
        mode=event.mode,
        generation=event.generation,
        slot=event.slot,
        rule=ExplainedRule(
            id=rule.id if rule else event.rule_id,
            index=event.rule_index,
            source=rule.source if rule else event.rule_source,
            inode=inode,
            actions=_actions(rule.actions) if rule else [],
            via=via or ("inherited" if event.inherited else ""),
        ),
        policy=ExplainedPolicy(
            name=rec.policy.name if rec else event.policy_name,
            version=rec.policy.version if rec else event.policy_version,
            digest=rec.policy.digest if rec else event.policy_digest,
            signer=rec.signer if rec else event.policy_signer,
            source=info.source if info else event.policy_source,
            record=info.record_path if info else "",
        ),
        scope=ExplainedScope(
            match=match,  # type: ignore[arg-type]
            cgroup_id=event.scope_cgroup_id,
            path=event.scope_cgroup_path,
            configured=configured,
        ),
        task=ExplainedTask(
            pid=event.pid, tid=event.tid, uid=event.uid, gid=event.gid, comm=event.comm,
            exe=event.exe, cgroup_id=event.cgroup_id, cgroup_path=event.cgroup_path,
            workload=event.workload,
        ),
        decision_path=path,
        consistent=not problems,
        inconsistencies=problems,
    )


class Explainer:
    """Stream processor: every deny (optionally every audit) -> its explanation."""

    def __init__(self, lookup: Callable[[int], GenerationInfo | None], *, audits: bool = False) -> None:
        self.lookup = lookup
        self.audits = audits
        self.explained = 0
        self.inconsistent = 0

    def process(self, event: DecisionEvent) -> ExplanationEvent | None:
        if event.decision != "deny" and not self.audits:
            return None
        out = explain(event, self.lookup(event.generation))
        self.explained += 1
        self.inconsistent += not out.consistent
        return out

    def snapshot(self) -> dict[str, int | bool]:
        return {"audits": self.audits, "explained": self.explained, "inconsistent": self.inconsistent}
