if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
