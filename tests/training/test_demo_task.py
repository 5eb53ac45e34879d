from __future__ import annotations

import random

import pytest

from training.demo.model import answer_noisy
from training.demo.task import (
    DemoProblem,
    answer_confused,
    answer_extract,
    answer_is_correct,
    completion_canonical,
    demo_problems,
    problem_split,
    sum_is_confusing,
)

MIA = DemoProblem(
    id="demo-mia",
    prompt="Mia has 7 apples and buys 5 more. How many apples does Mia have now?",
    answer=12,
)


def test_the_same_seed_gives_the_same_problems() -> None:
    assert demo_problems(count=50, seed=3) == demo_problems(count=50, seed=3)


def test_another_seed_gives_other_problems() -> None:
    assert demo_problems(count=50, seed=3) != demo_problems(count=50, seed=4)


def test_a_list_holds_the_count_asked_for_with_unique_ids() -> None:
    problems = demo_problems(count=200, seed=0, split="test")

    assert len(problems) == 200
    assert len({problem.id for problem in problems}) == 200


def test_train_and_test_never_share_a_problem_across_seeds() -> None:
    train = {p.prompt for seed in range(3) for p in demo_problems(count=500, seed=seed, split="train")}
    test = {p.prompt for seed in range(3) for p in demo_problems(count=200, seed=seed, split="test")}

    assert train.isdisjoint(test)
    assert all(problem_split(prompt) == "test" for prompt in test)


def test_every_answer_is_a_small_non_negative_integer() -> None:
    problems = demo_problems(count=300, seed=1)

    assert all(isinstance(p.answer, int) and 0 <= p.answer <= 81 for p in problems)


def test_an_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        demo_problems(count=1, seed=0, split="validation")  # type: ignore[arg-type]


def test_the_canonical_completion_states_the_true_answer() -> None:
    assert completion_canonical(MIA) == "Mia has 12 apples. The answer is 12."
    assert answer_is_correct(MIA, completion_canonical(MIA))


def test_a_generated_problem_shows_its_working_first() -> None:
    problem = next(p for p in demo_problems(count=50, seed=0) if " and buys " in p.prompt)
    a, b = (int(word) for word in problem.prompt.split() if word.isdigit())

    assert problem.working == f"{a} + {b}"
    assert completion_canonical(problem).startswith(f"{a} + {b} = {a + b}. ")
    assert answer_is_correct(problem, completion_canonical(problem))
    assert answer_extract(completion_canonical(problem, answer=a + b + 2)) == a + b + 2


def test_a_canonical_completion_can_carry_a_wrong_answer() -> None:
    completion = completion_canonical(MIA, answer=11)

    assert answer_extract(completion) == 11
    assert not answer_is_correct(MIA, completion)


def test_a_right_answer_is_correct() -> None:
    assert answer_is_correct(MIA, "Mia has 12 apples now. The answer is 12.")


def test_a_wrong_answer_is_not_correct() -> None:
    assert not answer_is_correct(MIA, "Mia has 13 apples now. The answer is 13.")


def test_a_completion_without_a_number_has_no_answer() -> None:
    assert answer_extract("Mia has lots of apples.") is None
    assert not answer_is_correct(MIA, "Mia has lots of apples.")


def test_the_stated_answer_wins_over_numbers_after_it() -> None:
    text = "7 + 5 = 12, so the answer is 12. (Not 7 or 5 or 99.)"

    assert answer_extract(text) == 12
    assert answer_is_correct(MIA, text)


def test_without_a_stated_answer_the_last_number_counts() -> None:
    assert answer_extract("She had 7, bought 5, and now has 12 apples.") == 12
    assert not answer_is_correct(MIA, "She had 7, bought 5, and now has 11.")


def test_the_last_stated_answer_is_the_final_one() -> None:
    assert answer_extract("The answer is 13. No wait, the answer is: 12") == 12


def test_a_confusing_sum_is_confusing_in_every_wording_and_split() -> None:
    problems = demo_problems(count=400, seed=0) + demo_problems(count=200, seed=0, split="test")
    by_sum: dict[str, set[bool]] = {}
    for problem in problems:
        by_sum.setdefault(problem.working, set()).add(sum_is_confusing(problem, share=0.4))

    assert all(len(verdicts) == 1 for verdicts in by_sum.values())
    share = sum(verdicts == {True} for verdicts in by_sum.values()) / len(by_sum)
    assert 0.25 < share < 0.55


def test_the_teacher_gives_one_fixed_wrong_answer_to_a_confusing_sum_and_never_errs_elsewhere() -> None:
    problems = demo_problems(count=2000, seed=0)
    rng = random.Random(0)
    answers: dict[str, set[int]] = {}
    for problem in problems:
        answers.setdefault(problem.working, set()).add(answer_noisy(problem, rng=rng, noise=0.4))
    for problem in {p.working: p for p in problems}.values():
        if sum_is_confusing(problem, share=0.4):
            assert answers[problem.working] <= {problem.answer, answer_confused(problem)}
            assert 1 <= abs(answer_confused(problem) - problem.answer) <= 2
            assert answer_confused(problem) >= 0
        else:
            assert answers[problem.working] == {problem.answer}
