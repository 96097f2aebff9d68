"""DKIM signing at acceptance (SPEC §12): keys, the signer step, rotation, DNS checks."""
