"""Several Empath nodes acting as one sender: shared policy in Redis (SPEC §11)."""
