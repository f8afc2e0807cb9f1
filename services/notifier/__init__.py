"""The notifier service: alert episodes to people (webhook, e-mail), exactly once per transition."""
