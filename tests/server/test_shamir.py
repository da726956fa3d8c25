"""The server's Shamir reconstruction (server/round/shamir.py) gives what Flower's does."""

import os
import random

import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares as flower_combine
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

from server.round.shamir import _inverse, _mul, combine_shares


def test_field_inverse():
    gen = random.Random(0)
    for _ in range(200):
        a = gen.getrandbits(128) or 1
        assert _mul(a, _inverse(a)) == 1


@pytest.mark.parametrize("threshold, num", [(2, 3), (4, 5), (11, 21), (27, 47)])
def test_secrets_of_both_kinds_come_back_from_any_threshold_shares(threshold, num):
    gen = random.Random(threshold)
    # What SecAgg+ shares: a client's 32-byte self-mask seed and its PEM private key (many chunks).
    for secret in (os.urandom(32), private_key_to_bytes(generate_key_pairs()[0])):
        shares = create_shares(secret, threshold, num)
        for _ in range(3):
            some = gen.sample(shares, gen.randint(threshold, num))
            assert combine_shares(some, threshold) == flower_combine(some) == secret


def test_too_few_or_mismatched_shares_are_refused():
    shares = create_shares(os.urandom(32), 3, 5)
    with pytest.raises(ValueError):
        combine_shares(shares[:2], 3)
    with pytest.raises(ValueError):
        combine_shares([shares[0], shares[0], shares[1]], 3)  # a repeated share is one share
    with pytest.raises(ValueError):
        combine_shares([shares[0], shares[1], shares[2][:-16]], 3)
