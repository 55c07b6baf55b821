"""_peers"""
