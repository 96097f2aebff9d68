"""DKIM signing at acceptance (DESIGN §12): keys, the signer step, rotation, DNS checks."""
