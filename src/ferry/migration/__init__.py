"""Moving a domain between hosts: the five-phase protocol (see docs/migration.md)."""
