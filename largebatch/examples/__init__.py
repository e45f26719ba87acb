"""Small examples of a user's own parts, for the README's commands and the tests."""
