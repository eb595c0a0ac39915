"""The mining benchmark's synthesis rows: the teacher/student cut, the held-out guard, a tiny run end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import cross_encoder, mining
from bench.common import Settings
from bench.tasks import TASKS, by_pair
from finetuner.api.layout import Record


def pair(question: str, answer: str) -> Record:
    return Record(chunks=[Record(text=question), Record(text=answer)])


HELD = by_pair([pair('what is held out?', 'the held-out answer'), pair('and this?', 'another held-out answer')])


def test_check_unseen_names_the_held_out_text_that_leaked() -> None:
    cross_encoder.check_unseen(['a training question', 'a training answer', None], HELD, 'the pairs')
    with pytest.raises(ValueError, match=r"the pairs holds the held-out text 'the held-out answer'"):
        cross_encoder.check_unseen(['a training answer', 'the held-out answer'], HELD, 'the pairs')
    with pytest.raises(ValueError, match=r"the corpus holds the held-out text 'and this\?'"):
        cross_encoder.check_unseen(['and this?'], HELD, 'the corpus')


def test_teacher_and_student_halves_are_disjoint_deterministic_and_free_of_held_out_texts() -> None:
    split = TASKS['qa'].split('report')
    halves = cross_encoder.teacher_student(split.train, split.held_out, seed=0)
    teacher = {r.chunks[0].text for r in halves.teacher}
    student = set(halves.student_questions)
    assert teacher and student and not teacher & student
    assert abs(len(teacher) - len(student)) <= 1
    # chatterbot-corpus repeats some answers under several questions: those pairs are dropped, the rest kept
    assert halves.dropped > 0
    assert len(halves.teacher) + len(halves.student) + halves.dropped == len(split.train)
    for records in (halves.teacher, halves.student):
        cross_encoder.check_unseen((c.text for r in records for c in r.chunks), split.held_out, 'a half')
    again = cross_encoder.teacher_student(split.train, split.held_out, seed=0)
    assert again.teacher == halves.teacher and again.student == halves.student
    other = cross_encoder.teacher_student(split.train, split.held_out, seed=1)
    assert {r.chunks[0].text for r in other.teacher} != teacher
    assert {r.chunks[0].text for r in other.teacher} | set(other.student_questions) == teacher | student


def test_every_teacher_pair_is_a_positive_with_one_negative_from_another_question() -> None:
    teacher = [pair('q1', 'a1'), pair('q1', 'a2'), pair('q2', 'a3'), pair('q3', 'a4')]
    questions, answers, labels = cross_encoder.labelled_pairs(teacher, seed=0)
    assert labels.count(1.0) == 4 and labels.count(0.0) == 4
    positives = {(q, a) for q, a, y in zip(questions, answers, labels, strict=True) if y == 1.0}
    assert positives == {('q1', 'a1'), ('q1', 'a2'), ('q2', 'a3'), ('q3', 'a4')}
    own = {'q1': {'a1', 'a2'}, 'q2': {'a3'}, 'q3': {'a4'}}
    assert all(a not in own[q] for q, a, y in zip(questions, answers, labels, strict=True) if y == 0.0)


def test_a_tiny_synthesis_run_gives_rows_with_numbers(tmp_path: Path) -> None:
    rows = mining.synthesis_rows(Settings(mode='tiny', workdir=tmp_path))
    assert [r.measure.split(' after')[0] for r in rows] == ['retrieval nDCG@10', 'retrieval MRR@10']
    for row in rows:
        assert row.ours is not None and row.reference is not None and row.ratio is not None and row.met is not None
        assert row.target == '>= pretrained' and row.reference_name == 'the pretrained model'
        assert 0.0 <= float(row.extra['ce_true_above_random']) <= 1.0
        assert row.extra['scored_tuples'] > 0 and row.extra['ce_training_pairs'] > 0
    assert (tmp_path / 'cross-encoders').is_dir()
    notes = mining.closing_notes(rows)
    assert len(notes) == 1 and 'ranks the true answer above a random other one' in notes[0]


def test_a_leak_past_the_filter_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cross_encoder, 'without_held_out', lambda pairs, held: (pairs, 0))
    with pytest.raises(ValueError, match='holds the held-out text'):
        mining.synthesis_rows(Settings(mode='tiny', workdir=tmp_path))


def test_true_above_random_draws_distinct_other_texts_and_counts_ties_half() -> None:
    held = by_pair(
        [pair('q1', 'same'), pair('q1', 'same'), pair('q2', 'same'), pair('q2', 'other'), pair('q3', 'third')]
    )
    drawn: list[tuple[str, str]] = []

    def scores(pairs: list[tuple[str, str]]) -> list[float]:
        drawn.extend(pairs)
        return [1.0 if answer == 'same' else 0.5 if answer == 'third' else 0.0 for _, answer in pairs]

    share = cross_encoder.true_above_random(scores, held, seed=0)
    randoms = dict(drawn[1::2])
    assert randoms['q1'] != 'same' and randoms['q2'] == 'third' and randoms['q3'] != 'third'
    # q1: its answer 'same' (1.0) beats any other; q2: 'same' (1.0) beats 'third'; q3: 'third' (0.5) vs 'same'
    # (1.0) loses or vs 'other' (0.0) wins
    assert share == (2 + (randoms['q3'] == 'other')) / 3
    assert cross_encoder.true_above_random(lambda pairs: [0.0] * len(pairs), held, seed=0) == 0.5
