"""Least privilege: the operator may make exactly the API calls its code makes; the trainer none."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.chart_support import FULLNAME, RELEASE_NAMESPACE, VALUE_SETS, by_kind, manifests_of, one

kube = pytest.importorskip(
    'finetuner_operator.kube', reason='finetuner_operator.kube (the operator I/O seam) does not exist yet'
)

Triple = tuple[str, str, str]

# Resources that are not namespaced in the Kubernetes API: a namespaced-mode operator gets them
# through its ClusterRole, everything else through a Role in each watched namespace.
CLUSTER_SCOPED = {('', 'namespaces'), ('apiextensions.k8s.io', 'customresourcedefinitions')}

# Kopf resolves its namespace list against the namespaces it lists and watches only when it is not
# cluster-wide (kopf._core.reactor.observation.namespace_observer); a cluster-wide operator never
# calls the namespaces API, so that mode does without those rights.
NOT_CALLED_IN_MODE: dict[str, set[Triple]] = {
    'clusterWide': {('', 'namespaces', 'list'), ('', 'namespaces', 'watch')},
    'namespaced': set(),
}


# The Lease of leader election lives in the release namespace only: its own Role there, not a cluster-wide right.
LEASES = {t for t in kube.API_CALLS if t[:2] == ('coordination.k8s.io', 'leases')}


def operator_calls(mode: str) -> set[Triple]:
    return set(kube.API_CALLS | kube.KOPF_CALLS) - NOT_CALLED_IN_MODE[mode] - LEASES


def leader_election_role(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [r for r in by_kind(docs, 'Role') if r['metadata']['name'].endswith('-leader-election')]
    return found[0] if found else None


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    found: set[Triple] = set()
    for rule in rules:
        assert 'nonResourceURLs' not in rule and 'resourceNames' not in rule, rule
        for field in ('apiGroups', 'resources', 'verbs'):
            assert '*' not in rule[field], f'wildcard in {field}: {rule}'
        found |= {(g, r, v) for g in rule['apiGroups'] for r in rule['resources'] for v in rule['verbs']}
    return found


def mode_of(value_set: str) -> str:
    return VALUE_SETS[value_set].get('mode', 'clusterWide')


@pytest.mark.parametrize('value_set', sorted(VALUE_SETS))
def test_operator_rules_are_exactly_the_calls_of_the_operator_code(value_set: str) -> None:
    docs = manifests_of(value_set)
    granted = triples(one(docs, 'ClusterRole')['rules'])
    election = leader_election_role(docs)
    assert election is not None and election['metadata']['namespace'] == RELEASE_NAMESPACE
    assert (
        triples(election['rules'])
        == LEASES
        == {('coordination.k8s.io', 'leases', verb) for verb in ('get', 'create', 'update')}
    )
    roles = [r for r in by_kind(docs, 'Role') if r is not election]
    role_triples = [triples(role['rules']) for role in roles]
    for extra in role_triples:
        granted |= extra
    expected = operator_calls(mode_of(value_set))
    assert granted - expected == set(), f'rules for calls the operator never makes: {sorted(granted - expected)}'
    assert expected - granted == set(), f'calls the operator makes without a rule: {sorted(expected - granted)}'
    if mode_of(value_set) == 'namespaced':
        assert role_triples and all(t == role_triples[0] for t in role_triples), 'every namespace gets the same Role'
        cluster_wide_grants = {(g, r) for g, r, _ in triples(one(docs, 'ClusterRole')['rules'])}
        assert cluster_wide_grants <= CLUSTER_SCOPED, 'a namespaced operator got cluster-wide namespaced rights'
        assert {(g, r) for g, r, _ in role_triples[0]}.isdisjoint(CLUSTER_SCOPED)
    else:
        assert roles == []


def test_the_code_seam_declares_calls_at_all() -> None:
    """Guards the test above against an empty seam making it vacuous."""
    assert ('batch', 'jobs', 'create') in kube.API_CALLS
    assert ('finetuner.dev', 'finetuneruns/status', 'patch') in kube.API_CALLS | kube.KOPF_CALLS


@pytest.mark.parametrize('value_set', sorted(VALUE_SETS))
def test_bindings_grant_only_the_operator_service_account(value_set: str) -> None:
    docs = manifests_of(value_set)
    operator_account = {'kind': 'ServiceAccount', 'name': f'{FULLNAME}-operator', 'namespace': RELEASE_NAMESPACE}
    bindings = by_kind(docs, 'ClusterRoleBinding') + by_kind(docs, 'RoleBinding')
    assert bindings
    for binding in bindings:
        assert binding['subjects'] == [operator_account], binding['metadata']
        assert binding['roleRef']['name'] in (f'{FULLNAME}-operator', f'{FULLNAME}-leader-election')
    deployment = one(docs, 'Deployment')
    assert deployment['spec']['template']['spec']['serviceAccountName'] == operator_account['name']


@pytest.mark.parametrize('value_set', sorted(VALUE_SETS))
def test_trainer_service_account_has_no_rights_and_no_token(value_set: str) -> None:
    docs = manifests_of(value_set)
    trainer_accounts = [sa for sa in by_kind(docs, 'ServiceAccount') if sa['metadata']['name'].endswith('-trainer')]
    assert trainer_accounts
    assert all(sa['automountServiceAccountToken'] is False for sa in trainer_accounts)
    names = {sa['metadata']['name'] for sa in trainer_accounts}
    for binding in by_kind(docs, 'ClusterRoleBinding') + by_kind(docs, 'RoleBinding'):
        assert not {s['name'] for s in binding['subjects']} & names, binding['metadata']
