"""The fleet console (`edgert fleet console`): live web pages of the fleet, its rollouts and its
experiments, with operator actions signed by the controller (never by the browser)."""
