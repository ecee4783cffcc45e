"""kvroute controller: discovery, engine load, breakers, policy and snapshots."""
