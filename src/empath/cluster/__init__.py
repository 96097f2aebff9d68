"""Several Empath nodes acting as one sender: shared policy in Redis (DESIGN §11)."""
