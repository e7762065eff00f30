"""The fleet: services that look beyond one host (locating a domain; the cluster
view, placement and evacuation are to come)."""
