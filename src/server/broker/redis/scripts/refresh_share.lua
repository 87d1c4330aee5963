local owner = redis.call('GET', KEYS[1])
if owner then
  if owner ~= ARGV[1] then
    return 0
  end
elseif ARGV[5] ~= '1' then
  return 0
else
  local claim = redis.call('GET', KEYS[2])
  if claim and claim ~= ARGV[2] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
return 1
