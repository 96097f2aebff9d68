"""SMTP protocol logic without I/O: parsing, the inbound state machine, replies, the client."""
