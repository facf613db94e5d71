"""Small shared pieces with no model knowledge: user-facing errors, crash-safe files and hashes,
console hygiene and format constants.
"""
