"""GSM8K and MATH answer extraction (megappo.data.answers)."""

from __future__ import annotations

import pytest

from megappo.data.answers import (
    extract_boxed,
    extract_gsm8k_reference,
    extract_gsm8k_response,
    has_boxed,
    has_gsm8k_marker,
    normalize_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", "72"),
        ("1,234", "1234"),
        ("$1,234.50.", "1234.5"),
        ("72.00", "72"),
        ("-3", "-3"),
        ("$-3", "-3"),
        ("-0", "0"),
        (".5", "0.5"),
        ("abc", None),
        ("", None),
        ("nan", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("so 3 + 4 = 7 #### 1,000", "1000"),
        ("#### -5", "-5"),
        ("42", "42"),
        ("#### none", None),
    ],
)
def test_gsm8k_reference(reference, expected):
    assert extract_gsm8k_reference(reference) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("3 + 4 = 7, then 7 * 2 = 14.\n#### 14", "14"),
        ("#### 10 is wrong, really #### $1,234.", "1234"),  # the last marker wins
        ("The answer is 5 apples and 12 pears.", "12"),  # no marker: the last number
        ("It costs $18.", "18"),
        ("Total: 3.50", "3.5"),
        ("no numbers here", None),
    ],
)
def test_gsm8k_response(response, expected):
    assert extract_gsm8k_response(response) == expected


def test_gsm8k_marker():
    assert has_gsm8k_marker("work... #### 12")
    assert not has_gsm8k_marker("the answer is 12")
    assert not has_gsm8k_marker("#### twelve")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{42}$.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{x^{2}+\\sqrt{y}}", "x^{2}+\\sqrt{y}"),  # nested braces, last box
        ("\\fbox{7}", "7"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected
    assert has_boxed(text) == (expected is not None)
