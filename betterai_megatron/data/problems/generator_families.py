"""The task families of the built-in generator, by difficulty level (1 = one formulaic line ... 5 = small algorithms).

A :class:`Family` is a template: a function name, a one-sentence docstring and a reference body, with parameters
(``{k}``, ``{a}``, ``{b}``) filled from ``params``, and a way to draw test arguments. Level 1 is deliberately
formulaic -- the function name says everything (``add_3`` -> ``return x + 3``) and every prompt has the same shape
-- so that a tiny model trained from scratch for minutes on a CPU can learn it; each level up asks for one more idea:

1. one arithmetic operation with the constant in the name;
2. one line with a builtin or two operations;
3. a comprehension or a conditional expression;
4. a loop with an accumulator (a few lines);
5. a small algorithm (search, parsing, two pointers, counting).

Bodies are indented by four spaces and contain no braces except doubled ones (they go through ``str.format``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_WORDS = ("apple", "banana", "cat", "dog", "level", "noon", "racecar", "code", "data", "model", "tree", "stack",
          "queue", "graph", "node", "python", "loop", "sum", "max", "min")


def _int(rng: random.Random, low: int = -50, high: int = 50) -> int:
    return rng.randint(low, high)


def _ints(rng: random.Random, low: int = -20, high: int = 20, max_len: int = 8, min_len: int = 0) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(min_len, max_len))]


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5)))


def _letters(rng: random.Random, alphabet: str = "aabbbc", max_len: int = 10) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


@dataclass(frozen=True)
class Family:
    name: str
    level: int
    entry: str  # function name template, e.g. "add_{k}"
    params: str  # parameter list, e.g. "x" or "a, b"
    doc: str  # one-sentence docstring template
    body: str  # reference body template (indented, ends without newline)
    args: Callable[[random.Random, dict], tuple]  # one test argument tuple, given the family parameters
    values: Sequence[dict] = ({},)  # the parameter settings this family takes


def _range(name: str, low: int, high: int) -> list[dict]:
    return [{name: value} for value in range(low, high + 1)]


def _one(draw: Callable[[random.Random], object]) -> Callable[[random.Random, dict], tuple]:
    return lambda rng, params: (draw(rng),)


FAMILIES: tuple[Family, ...] = (
    # ---------------------------------------------------------------- level 1: the name says it all
    Family("add_const", 1, "add_{k}", "x", "Return x plus {k}.", "    return x + {k}", _one(_int), _range("k", 1, 99)),
    Family("sub_const", 1, "subtract_{k}", "x", "Return x minus {k}.", "    return x - {k}", _one(_int),
           _range("k", 1, 99)),
    Family("mul_const", 1, "multiply_by_{k}", "x", "Return x times {k}.", "    return x * {k}", _one(_int),
           _range("k", 2, 30)),
    Family("return_const", 1, "return_{k}", "", "Return {k}.", "    return {k}", lambda rng, p: (),
           _range("k", 0, 99)),
    # ---------------------------------------------------------------- level 2: one line, a builtin or two ops
    Family("affine", 2, "times_{a}_plus_{b}", "x", "Return x times {a} plus {b}.", "    return x * {a} + {b}",
           _one(_int), [{"a": a, "b": b} for a in range(2, 10) for b in range(1, 10)]),
    Family("mod_const", 2, "mod_{k}", "x", "Return the remainder of x divided by {k}.", "    return x % {k}",
           _one(lambda rng: _int(rng, 0, 200)), _range("k", 2, 20)),
    Family("divisible", 2, "is_divisible_by_{k}", "x", "Return True if x is divisible by {k}.",
           "    return x % {k} == 0", _one(lambda rng: _int(rng, 0, 100)), _range("k", 2, 12)),
    Family("square", 2, "square", "x", "Return x squared.", "    return x * x", _one(_int)),
    Family("max2", 2, "max_of_two", "a, b", "Return the larger of a and b.", "    return max(a, b)",
           lambda rng, p: (_int(rng), _int(rng))),
    Family("min2", 2, "min_of_two", "a, b", "Return the smaller of a and b.", "    return min(a, b)",
           lambda rng, p: (_int(rng), _int(rng))),
    Family("absolute", 2, "absolute", "x", "Return the absolute value of x.", "    return abs(x)", _one(_int)),
    Family("sum_list", 2, "sum_list", "xs", "Return the sum of the numbers in xs.", "    return sum(xs)",
           _one(_ints)),
    Family("length", 2, "length", "xs", "Return the number of items in xs.", "    return len(xs)", _one(_ints)),
    Family("reverse_string", 2, "reverse_string", "s", "Return s reversed.", "    return s[::-1]", _one(_text)),
    Family("upper", 2, "to_upper", "s", "Return s in upper case.", "    return s.upper()", _one(_text)),
    Family("first", 2, "first_item", "xs", "Return the first item of xs.", "    return xs[0]",
           _one(lambda rng: _ints(rng, min_len=1))),
    Family("last", 2, "last_item", "xs", "Return the last item of xs.", "    return xs[-1]",
           _one(lambda rng: _ints(rng, min_len=1))),
    Family("max_list", 2, "max_of_list", "xs", "Return the largest number in xs.", "    return max(xs)",
           _one(lambda rng: _ints(rng, min_len=1))),
    # ---------------------------------------------------------------- level 3: a comprehension or a condition
    Family("add_each", 3, "add_{k}_to_each", "xs", "Return a list with {k} added to every number in xs.",
           "    return [x + {k} for x in xs]", _one(_ints), _range("k", 1, 20)),
    Family("mul_each", 3, "multiply_each_by_{k}", "xs", "Return a list with every number in xs times {k}.",
           "    return [x * {k} for x in xs]", _one(_ints), _range("k", 2, 10)),
    Family("keep_greater", 3, "keep_greater_than_{k}", "xs", "Return the numbers in xs that are greater than {k}.",
           "    return [x for x in xs if x > {k}]", _one(_ints), _range("k", 0, 15)),
    Family("count_value", 3, "count_{k}s", "xs", "Return how many times {k} occurs in xs.",
           "    return xs.count({k})", _one(lambda rng: _ints(rng, 0, 5, 10)), _range("k", 0, 5)),
    Family("clamp", 3, "clamp_{a}_{b}", "x", "Return x limited to the range {a} to {b}.",
           "    return max({a}, min({b}, x))", _one(_int),
           [{"a": a, "b": b} for a in (0, 1, 2, 3) for b in range(5, 31, 5)]),
    Family("sign", 3, "sign", "x", "Return 1 if x is positive, -1 if x is negative, else 0.",
           "    return 1 if x > 0 else -1 if x < 0 else 0", _one(lambda rng: _int(rng, -3, 3))),
    Family("evens", 3, "even_numbers", "xs", "Return the even numbers in xs.",
           "    return [x for x in xs if x % 2 == 0]", _one(_ints)),
    Family("sum_squares", 3, "sum_of_squares", "xs", "Return the sum of the squares of the numbers in xs.",
           "    return sum(x * x for x in xs)", _one(_ints)),
    Family("repeat", 3, "repeat_{k}_times", "s", "Return s repeated {k} times.", "    return s * {k}", _one(_word),
           _range("k", 2, 5)),
    Family("bigger_half", 3, "larger_than_average", "xs", "Return the numbers in xs greater than their average.",
           "    if not xs:\n        return []\n    average = sum(xs) / len(xs)\n    return [x for x in xs if x > average]",
           _one(_ints)),
    # ---------------------------------------------------------------- level 4: a loop with an accumulator
    Family("factorial", 4, "factorial", "n", "Return n factorial.",
           "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
           _one(lambda rng: _int(rng, 0, 12))),
    Family("fibonacci", 4, "fibonacci", "n", "Return the n-th Fibonacci number, with fibonacci(0) == 0.",
           "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
           _one(lambda rng: _int(rng, 0, 25))),
    Family("digit_sum", 4, "digit_sum", "n", "Return the sum of the decimal digits of the non-negative integer n.",
           "    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n    return total",
           _one(lambda rng: _int(rng, 0, 100000))),
    Family("count_vowels", 4, "count_vowels", "s", "Return the number of vowels (a, e, i, o, u) in s.",
           "    count = 0\n    for ch in s:\n        if ch in 'aeiou':\n            count += 1\n    return count",
           _one(_text)),
    Family("is_prime", 4, "is_prime", "n", "Return True if n is a prime number.",
           "    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
           "            return False\n        i += 1\n    return True", _one(lambda rng: _int(rng, 0, 100))),
    Family("sum_multiples", 4, "sum_multiples_of_{k}_below", "n", "Return the sum of the multiples of {k} below n.",
           "    total = 0\n    for i in range(n):\n        if i % {k} == 0:\n            total += i\n    return total",
           _one(lambda rng: _int(rng, 0, 60)), _range("k", 2, 9)),
    Family("count_multiples", 4, "count_multiples_of_{k}", "xs", "Return how many numbers in xs are multiples of {k}.",
           "    count = 0\n    for x in xs:\n        if x % {k} == 0:\n            count += 1\n    return count",
           _one(_ints), _range("k", 2, 9)),
    Family("power", 4, "power_of_{k}", "n", "Return {k} to the power n, for n >= 0, using a loop.",
           "    result = 1\n    for _ in range(n):\n        result *= {k}\n    return result",
           _one(lambda rng: _int(rng, 0, 10)), _range("k", 2, 9)),
    Family("gcd", 4, "gcd", "a, b", "Return the greatest common divisor of the non-negative integers a and b.",
           "    while b:\n        a, b = b, a % b\n    return a", lambda rng, p: (_int(rng, 0, 200), _int(rng, 0, 200))),
    Family("running_sum", 4, "running_sum", "xs", "Return the list of running totals of xs.",
           "    result = []\n    total = 0\n    for x in xs:\n        total += x\n        result.append(total)\n"
           "    return result", _one(_ints)),
    Family("reverse_words", 4, "reverse_words", "s", "Return the words of s in reverse order, joined by spaces.",
           "    words = s.split()\n    words.reverse()\n    return ' '.join(words)", _one(_text)),
    Family("product", 4, "product", "xs", "Return the product of the numbers in xs (1 for an empty list).",
           "    result = 1\n    for x in xs:\n        result *= x\n    return result",
           _one(lambda rng: _ints(rng, -5, 5, 6))),
    # ---------------------------------------------------------------- level 5: small algorithms
    Family("palindrome", 5, "is_palindrome", "s",
           "Return True if s reads the same backwards, ignoring case and non-letters.",
           "    letters = [ch.lower() for ch in s if ch.isalpha()]\n    return letters == letters[::-1]",
           _one(lambda rng: rng.choice(["Never odd or even", "A man, a plan", "noon", "Step on no pets!",
                                         _text(rng), _word(rng)]))),
    Family("rle", 5, "run_length_encode", "s",
           "Return s run-length encoded as letter-count pairs, e.g. 'aab' -> 'a2b1'.",
           "    result = ''\n    i = 0\n    while i < len(s):\n        j = i\n        while j < len(s) and s[j] == s[i]:\n"
           "            j += 1\n        result += s[i] + str(j - i)\n        i = j\n    return result",
           _one(_letters)),
    Family("binary_search", 5, "binary_search", "xs, target",
           "Return the index of target in the sorted list xs, or -1 if it is absent.",
           "    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if xs[mid] == target:\n"
           "            return mid\n        if xs[mid] < target:\n            lo = mid + 1\n        else:\n"
           "            hi = mid - 1\n    return -1",
           lambda rng, p: (sorted(set(_ints(rng, -30, 30, 10))), _int(rng, -30, 30))),
    Family("two_sum", 5, "two_sum", "nums, target",
           "Return the indices [i, j], i < j, of the first pair in nums adding up to target, or [] if none.",
           "    for i in range(len(nums)):\n        for j in range(i + 1, len(nums)):\n"
           "            if nums[i] + nums[j] == target:\n                return [i, j]\n    return []",
           lambda rng, p: (_ints(rng, -10, 10, 8), _int(rng, -10, 10))),
    Family("merge_sorted", 5, "merge_sorted", "a, b", "Return one sorted list with the items of sorted lists a and b.",
           "    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
           "            result.append(a[i])\n            i += 1\n        else:\n            result.append(b[j])\n"
           "            j += 1\n    return result + a[i:] + b[j:]",
           lambda rng, p: (sorted(_ints(rng)), sorted(_ints(rng)))),
    Family("common_prefix", 5, "longest_common_prefix", "words", "Return the longest common prefix of the words.",
           "    if not words:\n        return ''\n    prefix = words[0]\n    for word in words[1:]:\n"
           "        while not word.startswith(prefix):\n            prefix = prefix[:-1]\n    return prefix",
           _one(lambda rng: [rng.choice(["flow", "flower", "flight", "fly"]) + _letters(rng, "ab", 2)
                             for _ in range(rng.randint(0, 4))])),
    Family("balanced", 5, "is_balanced", "s", "Return True if the brackets ()[] in s are balanced.",
           "    pairs = dict(zip(')]', '(['))\n    stack = []\n    for ch in s:\n        if ch in '([':\n"
           "            stack.append(ch)\n        elif ch in pairs:\n            if not stack or stack.pop() != pairs[ch]:\n"
           "                return False\n    return not stack", _one(lambda rng: _letters(rng, "()[]", 8))),
    Family("most_frequent", 5, "most_frequent", "xs",
           "Return the most frequent item of the non-empty list xs; on a tie, the one seen first.",
           "    counts = dict()\n    for x in xs:\n        counts[x] = counts.get(x, 0) + 1\n"
           "    best = xs[0]\n    for x in xs:\n        if counts[x] > counts[best]:\n            best = x\n    return best",
           _one(lambda rng: _ints(rng, 0, 4, 9, 1))),
    Family("rotate", 5, "rotate_left_{k}", "xs", "Return xs rotated left by {k} positions.",
           "    if not xs:\n        return []\n    shift = {k} % len(xs)\n    return xs[shift:] + xs[:shift]",
           _one(_ints), _range("k", 1, 5)),
    Family("dedupe", 5, "remove_duplicates", "xs", "Return xs without repeated items, keeping the first of each.",
           "    seen = set()\n    result = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n"
           "            result.append(x)\n    return result", _one(lambda rng: _ints(rng, 0, 6, 10))),
    Family("caesar", 5, "caesar_shift_{k}", "s", "Return s with each lowercase letter shifted {k} places forward, wrapping.",
           "    result = ''\n    for ch in s:\n        if ch.islower():\n"
           "            result += chr((ord(ch) - ord('a') + {k}) % 26 + ord('a'))\n        else:\n"
           "            result += ch\n    return result", _one(lambda rng: _text(rng) + rng.choice(string.ascii_lowercase)),
           _range("k", 1, 25)),
)


def families_at(level: int) -> list[Family]:
    return [family for family in FAMILIES if family.level == level]
