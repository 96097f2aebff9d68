"""SMTP protocol logic without I/O: parsing, the inbound state machine, replies, the client."""

from empath import use_native

use_native(__name__, __path__)
