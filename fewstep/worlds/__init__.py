"""Small synthetic worlds with their own trained models, for end-to-end checks and evaluation."""
